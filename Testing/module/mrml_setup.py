"""A scene as Slicer prepares it (shared by the fixtures and by tests that need a second scene)."""
from __future__ import annotations

import types


def make_scene():
    """A fresh vtkMRMLScene with segmentation converters and the module logics Slicer registers at start-up."""
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                 slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
                 slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
        factory.RegisterConverterRule(rule())
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("colors", slicer.vtkSlicerColorLogic), ("volumes", slicer.vtkSlicerVolumesLogic),
                      ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic), ("markups", slicer.vtkSlicerMarkupsLogic),
                      ("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic), ("tables", slicer.vtkSlicerTablesLogic),
                      ("texts", slicer.vtkSlicerTextsLogic)):
        logic = cls()
        if hasattr(logic, "SetMRMLApplicationLogic"):
            logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        logics[name] = logic
    slicer.modules = types.SimpleNamespace(**{name: types.SimpleNamespace(logic=(lambda l=logic: l))
                                              for name, logic in logics.items()})
    scene._citrusv_logics = (app_logic, logics)  # keep the logics alive as long as the scene
    return scene
