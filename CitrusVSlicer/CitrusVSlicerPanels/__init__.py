"""The panel's sections, one mixin class each, that CitrusVSlicerWidget inherits (CitrusVSlicer.py stays the thin
Module / ParameterNode / Widget / Logic / Test file of Slicer's template).

A sub-package, not top-level .py files: Slicer takes every .py file directly in a module folder for a module of its
own, while a package is only imported. Unlike CitrusVSlicerLib, these import Qt and slicer: they run only in Slicer.
"""
