"""CitrusV module: text-prompted segmentation, detection and reports with the Citrus-V model.

This file stays thin (module description, parameter node, widget wiring, self-test); the work that can run
without Qt lives in CitrusVSlicerLib so that it can be tested headlessly.
"""

from typing import Optional

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#
# CitrusVSlicer
#


class CitrusVSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CitrusV")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CitrusV for 3D Slicer contributors"]
        self.parent.helpText = _("""
Segment, detect and describe findings in CT, MR and PET volumes from a text prompt (for example
"segment the liver" or "find the lung nodules"), using the Citrus-V medical multimodal model
(Qwen2.5-VL with a SAM2 mask decoder). The model runs in a separate backend process, on this computer or on a
GPU server; results come back as a segmentation on the input volume's grid, a findings table and a report.
See the <a href="https://github.com/citrusv-slicer/SlicerCitrusV#readme">module documentation</a>.
<br><br>
The Citrus-V model (<a href="https://github.com/jdh-algo/Citrus-V">jdh-algo/Citrus-V</a>) is released under
the Apache-2.0 license. If you use it, please cite: "Citrus-V: Advancing Medical Foundation Models with Unified
Medical Image Grounding for Clinical Reasoning", <a href="https://arxiv.org/abs/2509.19090">arXiv:2509.19090</a>.
<br><br>
Research use only: the results are not validated for clinical decisions.
""")
        self.parent.acknowledgementText = _("""
This extension was developed by the CitrusV for 3D Slicer contributors. It builds on the Citrus-V model and
its authors' public release, on Qwen2.5-VL and SAM2, and follows the structure of the 3D Slicer extension
template by Jean-Christophe Fillion-Robin (Kitware), Andras Lasso (PerkLab) and Steve Pieper (Isomics).
""")


#
# CitrusVSlicerParameterNode
#


@parameterNodeWrapper
class CitrusVSlicerParameterNode:
    """Panel state saved in the scene, so a saved scene reopens with the same volume and prompt.

    inputVolume - the volume the prompt is about.
    prompt - what to find, segment or describe, in plain language.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    prompt: str = ""


#
# CitrusVSlicerWidget
#


class CitrusVSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: binds the .ui widgets to the parameter node."""

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CitrusVSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # The top-level qMRMLWidget's mrmlSceneChanged(vtkMRMLScene*) signal is connected in the .ui to each
        # MRML widget's setMRMLScene(vtkMRMLScene*) slot, so this one call gives every selector the scene.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CitrusVSlicerLogic()

        # The parameter node is reset when the scene closes; follow it.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Apply stays disabled (as set in the .ui) until the backend client exists: a button that does
        # nothing would mislead the user.

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        # Parameter node stores all user choices in parameter values, node selections, etc.
        # so that when the scene is saved and reloaded, these settings are restored.
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[CitrusVSlicerParameterNode]) -> None:
        """Set and observe parameter node.

        The widgets are bound to the parameter node through their SlicerParameterName dynamic property in the
        .ui file, so changes made by scripts show up in the panel and the user's edits are saved in the scene.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)


#
# CitrusVSlicerLogic
#


class CitrusVSlicerLogic(ScriptedLoadableModuleLogic):
    """Computations the module can run without its panel (from scripts, tests or batch jobs)."""

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> CitrusVSlicerParameterNode:
        return CitrusVSlicerParameterNode(super().getParameterNode())


#
# CitrusVSlicerTest
#


class CitrusVSlicerTest(ScriptedLoadableModuleTest):
    """Self-test run inside Slicer (Reload and Test button, and the ctest registered by CMake)."""

    def setUp(self):
        """Reset the state: a scene clear is enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_ParameterNodeKeepsVolumeAndPrompt()

    def test_ParameterNodeKeepsVolumeAndPrompt(self):
        """The logic instantiates and its parameter node stores the panel's state in the scene."""
        self.delayDisplay("Starting the test")

        logic = CitrusVSlicerLogic()
        parameterNode = logic.getParameterNode()
        self.assertIsInstance(parameterNode, CitrusVSlicerParameterNode)

        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CitrusVTestVolume")
        parameterNode.inputVolume = volumeNode
        parameterNode.prompt = "segment the liver"

        # A fresh wrapper reads the same scene node: the values were stored, not just kept in Python.
        reloadedParameterNode = CitrusVSlicerLogic().getParameterNode()
        self.assertEqual(reloadedParameterNode.inputVolume.GetID(), volumeNode.GetID())
        self.assertEqual(reloadedParameterNode.prompt, "segment the liver")

        # Removing the volume from the scene must clear the reference rather than leave a dangling one.
        slicer.mrmlScene.RemoveNode(volumeNode)
        self.assertIsNone(reloadedParameterNode.inputVolume)

        self.delayDisplay("Test passed")
