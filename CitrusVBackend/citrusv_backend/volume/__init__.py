"""Volumes, by capability: `input` (files and DICOM series in), `slices` (what the model sees), `tasks` (segment,
detect, report, ask), `outputs` (files, DICOM, measurements); the tasks' options declared once (`options`) and
their command-line options derived from them (`arguments`). Refinement is its own package, `citrusv_backend.refine`."""
