"""The work behind the CitrusV module panel, kept out of CitrusVSlicer.py.

Everything in this package must import without Qt and without a running Slicer application (no top-level
``qt``, ``ctk``, ``slicer.app`` or ``slicer.ScriptedLoadableModule`` imports), so that pytest can exercise it
headlessly, with numpy alone or with real MRML through the ``slicer-core`` wheel. It is meant to hold the
backend HTTP client, the backend process manager, the writers that turn backend results into MRML nodes
(segmentation, findings table, markups) and the IJK/RAS geometry helpers. CitrusVSlicer.py only wires the
panel to these.
"""
