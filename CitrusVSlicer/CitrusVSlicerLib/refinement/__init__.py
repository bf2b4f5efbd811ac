"""Refining a segment from Slicer, one file per layer:

  segment.py     the segment in MRML: markups as voxel prompts, its voxels read and written, its tags, answers
                 applied to it (MRML and numpy, no I/O)
  controller.py  the Refine section's behaviour: placements become steps sent one at a time, Undo and Redo
                 (no MRML wiring, no Qt)
  scene.py       one refinement against the scene: the volume's upload, the segment's markups wired to the
                 controller, the courier as its transport
"""
