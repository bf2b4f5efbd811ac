"""`citrusv batch`: a folder of volumes through the volume pipeline, locally or on a Ray cluster.

Modules, from the input side to the output side:
- discovery: which files (and DICOM series folders) are cases, and their safe, unique case ids;
- prompts:   what to ask per case (--prompt, or a CSV/YAML file per case or per folder);
- casework:  the per-case work shared by every engine: read + checksum, pipeline, write_outputs;
- local:     one machine: I/O worker processes read ahead of the model; one model process per GPU;
- ray_engine: one model actor per GPU across a Ray cluster, results written by the driver;
- manifest:  the append-only run manifest that makes a run resumable (a case is done when its line is);
- runner:    planning, resume, committing case folders, signals, summary.csv and index.html.

Nothing here imports torch at import time: the I/O worker processes import only what reading needs.
"""
