"""CitrusV module: text-prompted segmentation, detection and reports with the Citrus-V model.

This file stays thin (module description, parameter node, widget wiring, self-test); the work lives in CitrusVSlicerLib,
which imports without Qt and is tested headlessly. All I/O is asynchronous and runs outside Slicer's process (the
backend server, the installer, batch runs, and the HTTP courier that does every request): one timer on the main
thread polls it, so the panel never waits on the network, a child process or a Python thread (PythonQt never
releases the GIL while Qt's event loop runs). See CitrusVSlicerLib/transport.py for the design.
"""

import os
import platform
import time
from pathlib import Path
from typing import Annotated, Optional

import qt

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer import vtkMRMLMarkupsROINode, vtkMRMLTextNode  # the Conversation section's nodes
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CitrusVSlicerLib.endpoints import BackendError, Target
from CitrusVSlicerLib.first_use import FirstUse
from CitrusVSlicerLib.installer import explain_failure, installed_summary
from CitrusVSlicerLib.key_slice import jump_to_key_slice, segment_evidence
from CitrusVSlicerLib.logic import ModuleLogic
from CitrusVSlicerLib.manager import session_manager
from CitrusVSlicerLib.scene_export import export_summary, source_volume
from CitrusVSlicerLib import selftest
from CitrusVSlicerLib.backend_options import AXES, MODES, PIXEL_BUDGET_MAX, WINDOWS
from CitrusVSlicerLib.options import task_options
from CitrusVSlicerLib.conversation import history_markdown, turn_details, turn_title
from CitrusVSlicerLib.conversation_scene import (CONVERSATION_ATTRIBUTE, create_history, histories_of, history_volume,
                                                 jump_to_turn, propagation_question, question_for, read_history)
from CitrusVSlicerLib.view_slice import ViewNotAligned

TASKS = ["Segment", "Detect", "Report", "Ask"]
BACKEND_MODES = ["Local (this computer)", "Remote (server)"]
DEFAULT_MODEL = "jdh-algo/Citrus-V-8B-v1.0"
IDLE_TICK_MS = 200
CONVERSATION_VIEWS = ["Red", "Yellow", "Green"]

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
    """Every panel setting, saved with the scene (the remote token is deliberately not: secrets stay out of scenes)."""

    inputVolume: vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(TASKS)] = "Segment"
    prompt: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode
    replaceExistingSegments: bool = False
    backendMode: Annotated[str, Choice(BACKEND_MODES)] = BACKEND_MODES[0]
    model: str = DEFAULT_MODEL
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    remoteUrl: str = ""
    batchInputFolder: str = ""
    batchOutputFolder: str = ""
    mode: Annotated[str, Choice(list(MODES))] = MODES[0]
    window: Annotated[str, Choice(list(WINDOWS))] = WINDOWS[0]
    axis: Annotated[str, Choice(list(AXES))] = AXES[0]
    sliceRange: str = ""
    # Bounded: without WithinRange Slicer's connector gives the spin box -2**31..2**31-1.
    maxPixels: Annotated[int, WithinRange(0, PIXEL_BUDGET_MAX)] = 0
    refinePropagate: bool = True
    refineKeepText: bool = False
    conversation: vtkMRMLTextNode          # the history shown (a text node of JSON, saved with the scene)
    conversationView: Annotated[str, Choice(CONVERSATION_VIEWS)] = "Red"
    conversationRoi: vtkMRMLMarkupsROINode


#
# CitrusVSlicerWidget
#


class CitrusVSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: widgets bound to the parameter node; one timer advances everything that runs outside Slicer."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._consentedUrls = set()
        self._promptHistory = []
        self._statusShownFor = None
        self._pendingInstall = None
        self._installReported = None
        self._pendingInstallUpdate = False
        self._failureShownFor = None
        self._downloadReported = None
        self._refineShortcuts = []
        self._conversationCache = (None, [])  # ((node id, modified time), turns) of the shown conversation

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CitrusVSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CitrusVSlicerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.clicked.connect(self.onApply)
        self.ui.promptLineEdit.returnPressed.connect(self.onApply)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        # Explicit signatures: Qt5's QComboBox has activated/currentIndexChanged overloads (int and QString).
        self.ui.examplesComboBox.connect("activated(int)", self.onExampleChosen)
        self.ui.installBackendButton.clicked.connect(lambda: self.onInstall())  # not clicked(bool) as `update`
        self.ui.startBackendButton.clicked.connect(self.onStartBackend)
        self.ui.stopBackendButton.clicked.connect(self.onStopBackend)
        self.ui.restartBackendButton.clicked.connect(self.onRestartBackend)
        self.ui.testConnectionButton.clicked.connect(self.onTestConnection)
        self.ui.modelBrowseButton.clicked.connect(self.onBrowseModel)
        self.ui.backendPythonBrowseButton.clicked.connect(self.onBrowseBackendPython)
        self.ui.backendPythonLineEdit.text = self.logic.firstUse.settings.backend_python
        self.ui.backendPythonLineEdit.connect("editingFinished()", self.onBackendPythonEdited)
        self.setupFirstUse()
        self.ui.backendModeComboBox.connect("currentIndexChanged(int)", self.onBackendModeChanged)
        self.ui.batchInputBrowseButton.clicked.connect(lambda: self.browseFolder(self.ui.batchInputLineEdit))
        self.ui.batchOutputBrowseButton.clicked.connect(lambda: self.browseFolder(self.ui.batchOutputLineEdit))
        self.ui.batchRunButton.clicked.connect(self.onRunBatch)
        self.ui.batchCancelButton.clicked.connect(self.onCancelBatch)
        self.ui.batchOpenResultsButton.clicked.connect(self.onOpenBatchResults)
        self.setupRefine()
        self.ui.exportDicomButton.clicked.connect(self.onExportDicom)
        self.ui.resultsJumpButton.clicked.connect(self.onJumpToKeySlice)
        self.setupConversation()

        # One single-shot timer, re-armed after every tick with the delay the work asks for: 0 ms while there is
        # local work (writing a volume, decoding a result), a few ms while an answer is due, 200 ms when idle.
        self.timer = qt.QTimer()
        self.timer.setSingleShot(True)
        self.timer.timeout.connect(self.onTimer)
        self.timer.start(0)
        self.logic.installQuitHook()
        self.initializeParameterNode()
        self.showConversation()
        self.updateGui()

    def cleanup(self) -> None:
        # Reload calls this: the backend, batch and courier belong to the session manager and keep running.
        self.timer.stop()
        self.removeObservers()
        self.logic.stopRefine()
        self.removeRefineShortcuts()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.installRefineShortcuts()

    def exit(self) -> None:
        self.removeRefineShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        # A running Apply cancels itself when the scene closes (SceneApply observes the scene); so does refinement.
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.applyMachineSettings(self._parameterNode)
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[CitrusVSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # ------------------------------------------------------------------------------------------ state

    def isRemote(self) -> bool:
        return self.ui.backendModeComboBox.currentIndex == 1

    def currentTarget(self) -> Target:
        """Where a request goes now: decided by the mode shown in the panel at this moment."""
        node = self._parameterNode
        return self.logic.backend.target(self.isRemote(), node.remoteUrl if node else "", self.ui.remoteTokenLineEdit.text)

    def updateGui(self) -> None:
        busy = self.logic.applying
        state = self.logic.backend.state
        ready = self.isRemote() or state == "running"
        self.ui.applyButton.enabled = ready and not busy
        self.ui.applyButton.toolTip = "" if ready else _("Start the backend first (Backend section)")
        self.ui.cancelButton.enabled = busy
        local = not self.isRemote()
        for widget in (self.ui.modelLineEdit, self.ui.modelBrowseButton, self.ui.deviceComboBox, self.ui.installBackendButton,
                       self.ui.startBackendButton, self.ui.backendPythonLineEdit, self.ui.backendPythonBrowseButton):
            widget.enabled = local
        installing = self.logic.backend.installer is not None and self.logic.backend.installer.is_running()
        self.ui.installBackendButton.enabled = local and not installing
        self.ui.startBackendButton.enabled = local and not installing and state in ("stopped", "exited", "crashed")
        self.ui.remoteUrlLineEdit.enabled = not local
        self.ui.remoteTokenLineEdit.enabled = not local
        self.ui.stopBackendButton.enabled = local and state in ("starting", "running")
        self.ui.restartBackendButton.enabled = local and state in ("running", "crashed", "exited")
        batch = self.logic.backend.batch
        batchBusy = batch is not None and batch.is_running()
        self.ui.batchRunButton.enabled = not batchBusy
        self.ui.batchCancelButton.enabled = batchBusy
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        self.ui.exportDicomButton.enabled = not busy and segmentation is not None and \
            segmentation.GetSegmentation().GetNumberOfSegments() > 0
        self.ui.resultsJumpButton.enabled = self.ui.resultsKeySliceComboBox.count > 0
        refinement = self.logic.refinement
        self.ui.refineUndoButton.enabled = refinement is not None and refinement.can_undo
        self.ui.refineRedoButton.enabled = refinement is not None and refinement.can_redo
        self.updateConversationButtons(ready)

    def setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")

    def onTimer(self) -> None:
        delay = IDLE_TICK_MS / 1000.0
        try:
            delay = self.logic.poll()
            for line in self.logic.backend.drain_logs():
                self.ui.backendLogTextEdit.appendPlainText(line)
            for event in self.logic.applyEvents():
                self.onApplyEvent(event)
            for event in self.logic.askEvents():
                self.onConversationEvent(event)
            self.updateBackendStatus()
            self.updateInstall()
            self.updateDownload()
            self.updateBatch()
            self.updateGui()
        finally:  # re-armed even if a step failed, so the panel never freezes silently
            self.timer.start(int(1000 * min(delay, IDLE_TICK_MS / 1000.0)))

    def updateBackendStatus(self) -> None:
        if self.isRemote():
            return  # the remote status line is what the last Test connection said; nothing overwrites it
        backend = self.logic.backend
        state = backend.state
        if state == "running":
            if self._statusShownFor is not backend.process:
                self._statusShownFor = backend.process
                self.ui.deviceStatusLabel.text = _("running (asking the backend which device it uses...)")
                self.setStatus(_("Backend ready."))
                backend.request_status(backend.local_target(), self.onDeviceStatus)
            return
        failure = backend.failure   # why it did not start or stopped: the reason with its fix, said once
        if failure and self._failureShownFor is not backend.process:
            self._failureShownFor = backend.process
            self.setStatus(failure, error=True)
        self._statusShownFor = None
        bar = backend.process.progress_line if backend.process is not None and state == "starting" else ""
        self.ui.deviceStatusLabel.text = f"{state}: {bar}" if bar else state   # a progress bar still on its line

    def onDeviceStatus(self, text, error) -> None:
        if self.isRemote():
            return
        self.ui.deviceStatusLabel.text = text if text else str(error)

    # ------------------------------------------------------------------------------------------ Apply

    def onExampleChosen(self, index: int) -> None:
        if index > 0:
            self.ui.promptLineEdit.text = self.ui.examplesComboBox.itemText(index)
        self.ui.examplesComboBox.setCurrentIndex(0)

    def rememberPrompt(self, prompt: str) -> None:
        if prompt and prompt not in self._promptHistory:
            self._promptHistory.insert(0, prompt)
            self.ui.examplesComboBox.insertItem(1, prompt)

    def onApply(self) -> None:
        if self.logic.applying:
            return
        node = self._parameterNode
        if not node.inputVolume:
            self.setStatus(_("Choose an input volume."), error=True)
            return
        if node.task != "Report" and not node.prompt.strip():
            self.setStatus(_("Type a prompt, e.g. 'segment the liver'."), error=True)
            return
        try:
            target = self.currentTarget()
            if self.logic.backend.needs_consent(target) and not self.askConsent(target.url):
                self.setStatus(_("Cancelled: no image data was sent."))
                return
            # The nodes are captured here: changing the selection while the job runs changes nothing.
            self.logic.startApply(target, node.inputVolume, node.task.lower(), node.prompt, self.logic.taskOptions(node),
                                  node.outputSegmentation, node.outputTable, node.replaceExistingSegments)
        except (BackendError, ValueError) as error:
            self.setStatus(str(error), error=True)
            return
        self.rememberPrompt(node.prompt)
        self.ui.progressBar.value = 0
        self.setStatus(_("Working..."))
        self.timer.start(0)
        self.updateGui()

    def askConsent(self, url: str) -> bool:
        if url in self._consentedUrls:
            return True
        answer = qt.QMessageBox.question(
            slicer.util.mainWindow(), _("Send image data?"),
            _("The volume will be sent to the server at {url}. Only continue if you are allowed to share this image "
              "data with that server.").format(url=url), qt.QMessageBox.Yes | qt.QMessageBox.No, qt.QMessageBox.No)
        if answer == qt.QMessageBox.Yes:
            self._consentedUrls.add(url)
            return True
        return False

    def onCancel(self) -> None:
        self.logic.cancelApply()
        self.setStatus(_("Cancelling..."))

    def onApplyEvent(self, event) -> None:
        if event.kind == "progress":
            self.ui.progressBar.value = int(100 * event.fraction)
            self.setStatus(f"{event.stage}: {event.message}" if event.message else event.stage)
        elif event.kind == "done":
            written = event.written
            node = self._parameterNode
            if node is not None:  # show the nodes written to (those captured at Apply, or new ones)
                node.outputSegmentation = written["segmentation"] or node.outputSegmentation
                node.outputTable = written["table"] or node.outputTable
            self.updateRefineSegments()
            self.ui.answerTextEdit.setPlainText(event.result.report_text)
            self.ui.progressBar.value = 100
            # What was found, what was not and why, and the problems (results.py words it).
            self.setStatus(event.result.status_text, error=event.result.found_nothing)
        elif event.kind == "error":
            self.ui.progressBar.value = 0
            self.setStatus(event.message, error=True)
        elif event.kind == "cancelled":
            self.ui.progressBar.value = 0
            self.setStatus(_("Cancelled.") if event.message == "cancelled" else event.message)

    # ------------------------------------------------------------------------------------------ Refine

    def setupRefine(self) -> None:
        """Include / exclude point lists and a box placed on any slice view; each placement is one step."""
        self.ui.refineStartButton.clicked.connect(self.onRefineStart)
        self.ui.refineUndoButton.clicked.connect(self.onRefineUndo)
        self.ui.refineRedoButton.clicked.connect(self.onRefineRedo)
        self.ui.refineClearButton.clicked.connect(self.onRefineClear)
        self.ui.refineSegmentComboBox.connect("activated(int)", lambda index: self.logic.stopRefine())
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   lambda node: self.updateRefineSegments())
        for widget in (self.ui.refineIncludePlaceWidget, self.ui.refineExcludePlaceWidget):
            widget.setPlaceModePersistency(True)
        self.updateRefineSegments()

    def updateKeySliceSegments(self) -> None:
        """The output segmentation's segments that have a key slice, with their evidence as tooltips."""
        combo = self.ui.resultsKeySliceComboBox
        combo.clear()
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        if segmentation is None:
            return
        for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
            segment = segmentation.GetSegmentation().GetNthSegment(index)
            evidence = segment_evidence(segment)
            if evidence["key_slice"] is None:
                continue
            combo.addItem(f"{segment.GetName()} (slice {evidence['key_slice']})",
                          segmentation.GetSegmentation().GetNthSegmentID(index))
            tip = _("key slice {k} ({axis}), score {score}").format(
                k=evidence["key_slice"], axis=evidence["axis"],
                score="-" if evidence["score"] is None else f"{evidence['score']:.3g}")
            combo.setItemData(combo.count - 1, tip + ("\n" + evidence["answer"] if evidence["answer"] else ""),
                              qt.Qt.ToolTipRole)

    def onJumpToKeySlice(self) -> None:
        node = self._parameterNode
        segmentId = self.ui.resultsKeySliceComboBox.currentData
        if node is None or node.outputSegmentation is None or not segmentId or not node.inputVolume:
            return
        try:  # on the volume the segmentation was made on
            jump_to_key_slice(slicer.mrmlScene, source_volume(node.outputSegmentation, node.inputVolume),
                              node.outputSegmentation, segmentId)
        except ValueError as error:
            self.setStatus(str(error), error=True)

    def updateRefineSegments(self) -> None:
        self.updateKeySliceSegments()
        combo = self.ui.refineSegmentComboBox
        current = combo.currentData
        combo.clear()
        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        if segmentation is not None:
            for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
                segment = segmentation.GetSegmentation().GetNthSegment(index)
                combo.addItem(segment.GetName(), segmentation.GetSegmentation().GetNthSegmentID(index))
        found = combo.findData(current) if current else -1
        combo.setCurrentIndex(found if found >= 0 else 0)

    def onRefineStart(self) -> None:
        node = self._parameterNode
        segmentation, segmentId = node.outputSegmentation, self.ui.refineSegmentComboBox.currentData
        if not node.inputVolume or segmentation is None or not segmentId:
            self.setRefineStatus(_("Segment the volume first (Apply), then pick the segment to correct."), True)
            return
        try:
            target = self.currentTarget()
            if self.logic.backend.needs_consent(target) and not self.askConsent(target.url):
                self.setRefineStatus(_("Cancelled: no image data was sent."))
                return
            refinement = self.logic.startRefine(target, node.inputVolume, segmentation, segmentId,
                                                self.logic.taskOptions(node),
                                                {"propagate": node.refinePropagate, "keep_text": node.refineKeepText},
                                                self.setRefineStatus)
        except (BackendError, ValueError) as error:
            self.setRefineStatus(str(error), True)
            return
        self.ui.refineIncludePlaceWidget.setCurrentNode(refinement.include)
        self.ui.refineExcludePlaceWidget.setCurrentNode(refinement.exclude)
        self.ui.refineBoxPlaceWidget.setCurrentNode(refinement.box)
        self.timer.start(0)

    def onRefineUndo(self) -> None:
        if self.logic.refinement is not None:
            self.logic.refinement.undo()
            self.timer.start(0)

    def onRefineRedo(self) -> None:
        if self.logic.refinement is not None:
            self.logic.refinement.redo()
            self.timer.start(0)

    def onRefineClear(self) -> None:
        for widget in (self.ui.refineIncludePlaceWidget, self.ui.refineExcludePlaceWidget, self.ui.refineBoxPlaceWidget):
            markups = widget.currentNode()
            if markups is not None:
                markups.RemoveAllControlPoints()

    def setRefineStatus(self, text: str, error: bool = False) -> None:
        self.ui.refineStatusLabel.text = text
        self.ui.refineStatusLabel.setStyleSheet("color: #c0392b" if error else "")

    def installRefineShortcuts(self) -> None:
        """Ctrl+Z / Ctrl+Y (Ctrl+Shift+Z) while this module is shown: one refinement, one step (as the Segment
        Editor installs its own while it is shown)."""
        if self._refineShortcuts:
            return
        for sequence, slot in ((qt.QKeySequence.Undo, self.onRefineUndo), (qt.QKeySequence.Redo, self.onRefineRedo),
                               ("Ctrl+Y", self.onRefineRedo)):
            shortcut = qt.QShortcut(qt.QKeySequence(sequence), slicer.util.mainWindow())
            shortcut.connect("activated()", slot)
            self._refineShortcuts.append(shortcut)

    def removeRefineShortcuts(self) -> None:
        for shortcut in self._refineShortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._refineShortcuts = []

    def onExportDicom(self) -> None:
        node = self._parameterNode
        self.setStatus(_("Exporting the segments as they are in the scene to DICOM..."))
        try:
            self.logic.exportDicom(self.currentTarget(), node.inputVolume if node else None,
                                   node.outputSegmentation if node else None, self.onExportDicomDone)
        except BackendError as error:
            self.setStatus(_("DICOM export refused: ") + str(error), error=True)
            return
        self.timer.start(0)

    def onExportDicomDone(self, done, error) -> None:
        if error is not None:
            self.setStatus(_("DICOM export refused: ") + str(error), error=True)
            return
        self.setStatus(export_summary(done))

    # ------------------------------------------------------------------------------------------ Conversation

    def setupConversation(self) -> None:
        """Questions about the slice a view shows; the history lives in the scene (CitrusVSlicerLib/conversation*)."""
        self.ui.conversationSelector.addAttribute("vtkMRMLTextNode", CONVERSATION_ATTRIBUTE, "1")
        self.ui.conversationSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self.showConversation())
        self.ui.conversationNewButton.clicked.connect(self.onConversationNew)
        self.ui.conversationAskButton.clicked.connect(self.onConversationAsk)
        self.ui.conversationPromptLineEdit.returnPressed.connect(self.onConversationAsk)
        self.ui.conversationCancelButton.clicked.connect(self.onConversationCancel)
        self.ui.conversationTurnsListWidget.connect("currentRowChanged(int)", self.onConversationTurnSelected)
        self.ui.conversationPropagateButton.clicked.connect(self.onConversationPropagate)
        self.ui.conversationExportButton.clicked.connect(self.onConversationExport)

    def conversationTurns(self) -> list:
        """The shown conversation's turns, parsed again only when its node changed (the timer asks every tick)."""
        history = self._parameterNode.conversation if self._parameterNode else None
        if history is None:
            return []
        key = (history.GetID(), history.GetMTime())
        if self._conversationCache[0] != key:
            try:
                self._conversationCache = (key, read_history(history)["turns"])
            except ValueError:
                self._conversationCache = (key, [])
        return self._conversationCache[1]

    def selectedTurn(self):
        turns = self.conversationTurns()
        row = self.ui.conversationTurnsListWidget.currentRow
        return turns[row] if 0 <= row < len(turns) else None

    def updateConversationButtons(self, ready: bool) -> None:
        asking = self.logic.asking
        self.ui.conversationAskButton.enabled = ready and not asking
        self.ui.conversationCancelButton.enabled = asking
        turn = self.selectedTurn()
        made_segment = turn is not None and any(s.get("found") for s in turn.get("segments", []))
        self.ui.conversationPropagateButton.enabled = ready and not asking and made_segment
        self.ui.conversationExportButton.enabled = bool(self.conversationTurns())

    def setConversationStatus(self, text: str, error: bool = False) -> None:
        self.ui.conversationStatusLabel.text = text
        self.ui.conversationStatusLabel.setStyleSheet("color: #c0392b" if error else "")

    def showConversation(self, select: int = -1) -> None:
        """List the shown conversation's turns (without moving the views), the last or `select`-th one selected."""
        turns = self.conversationTurns()
        listWidget = self.ui.conversationTurnsListWidget
        listWidget.blockSignals(True)
        listWidget.clear()
        for turn in turns:
            listWidget.addItem(turn_title(turn))
        row = select if 0 <= select < len(turns) else len(turns) - 1
        listWidget.setCurrentRow(row)
        listWidget.blockSignals(False)
        self.ui.conversationDetailsTextEdit.setPlainText(turn_details(turns[row]) if turns else "")

    def onConversationNew(self) -> None:
        node = self._parameterNode
        if not node or not node.inputVolume:
            self.setConversationStatus(_("Choose an input volume."), error=True)
            return
        node.conversation = create_history(slicer.mrmlScene, node.inputVolume)
        self.setConversationStatus(_("New conversation: the model will not see the earlier ones."))

    def onConversationAsk(self) -> None:
        node = self._parameterNode
        if self.logic.asking or not node:
            return
        if not node.inputVolume:
            self.setConversationStatus(_("Choose an input volume."), error=True)
            return
        try:
            question = question_for(slicer.mrmlScene, node.inputVolume, node.conversationView,
                                    self.ui.conversationPromptLineEdit.text, node.window, node.conversationRoi)
        except ValueError as error:  # ViewNotAligned too: its message says what to do
            self.setConversationStatus(str(error), error=True)
            return
        self.askConversation(question)

    def askConversation(self, question) -> None:
        node = self._parameterNode
        try:
            target = self.currentTarget()
            if self.logic.backend.needs_consent(target) and not self.askConsent(target.url):
                self.setConversationStatus(_("Cancelled: no image data was sent."))
                return
            history = node.conversation
            if history is None or history_volume(history) is not node.inputVolume:  # the volume's latest, or a new one
                earlier = histories_of(slicer.mrmlScene, node.inputVolume)
                history = earlier[-1] if earlier else create_history(slicer.mrmlScene, node.inputVolume)
                node.conversation = history
            self.logic.startAsk(target, node.inputVolume, history, question)
        except (BackendError, ValueError) as error:
            self.setConversationStatus(str(error), error=True)
            return
        self.ui.conversationProgressBar.value = 0
        self.setConversationStatus(_("Asking about {axis} slice {index}...").format(axis=question.axis,
                                                                                  index=question.slice))
        self.timer.start(0)
        self.updateGui()

    def onConversationCancel(self) -> None:
        self.logic.cancelAsk()
        self.setConversationStatus(_("Cancelling..."))

    def onConversationEvent(self, event) -> None:
        if event.kind == "progress":
            self.ui.conversationProgressBar.value = int(100 * event.fraction)
            self.setConversationStatus(f"{event.stage}: {event.message}" if event.message else event.stage)
        elif event.kind == "done":
            turn = event.written["turn"]
            self.ui.conversationProgressBar.value = 100
            self.ui.conversationPromptLineEdit.text = ""
            self.showConversation()
            self.setConversationStatus(turn_title(turn))
        else:
            self.ui.conversationProgressBar.value = 0
            self.setConversationStatus(_("Cancelled.") if event.message == "cancelled" else event.message,
                                       error=event.kind == "error")

    def onConversationTurnSelected(self, row: int) -> None:
        turn = self.selectedTurn()
        if turn is None:
            return
        self.ui.conversationDetailsTextEdit.setPlainText(turn_details(turn))
        volume = history_volume(self._parameterNode.conversation)  # selectedTurn found one: the node is there
        if volume is not None:
            try:
                jump_to_turn(slicer.mrmlScene, volume, turn)
            except ViewNotAligned as error:
                self.setConversationStatus(str(error), error=True)
        self.updateGui()

    def onConversationPropagate(self) -> None:
        turn = self.selectedTurn()
        if turn is not None and not self.logic.asking:
            self.askConversation(propagation_question(turn))

    def onConversationExport(self) -> None:
        history = self._parameterNode.conversation if self._parameterNode else None
        if history is None:
            return
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Export the conversation"),
                                              history.GetName() + ".md", "Markdown (*.md)")
        if path:
            volume = history_volume(history)
            Path(path).write_text(history_markdown(read_history(history), volume.GetName() if volume else ""),
                                  encoding="utf-8")
            self.setConversationStatus(_("Conversation saved to {path}.").format(path=path))

    # ------------------------------------------------------------------------------------------ Backend

    def onBackendModeChanged(self, index: int) -> None:
        self.ui.deviceStatusLabel.text = _("press Test connection") if self.isRemote() else self.logic.backend.state
        self._statusShownFor = None
        self.updateGui()

    def onBrowseBackendPython(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Choose a Python 3.10+ executable"),
                                              self.ui.backendPythonLineEdit.text)
        if path:
            self.ui.backendPythonLineEdit.text = path
            self.onBackendPythonEdited()

    def onBackendPythonEdited(self) -> None:
        self.logic.firstUse.settings.backend_python = self.ui.backendPythonLineEdit.text.strip()
        self.logic.firstUse.save()

    def onInstall(self, update: bool = False) -> None:
        """Probe the GPU (a child process), then ask; the timer shows the dialog once the probe has finished."""
        if self.logic.backend.backend_dir is None:
            self.setStatus(_("The CitrusV backend is not bundled with this module: reinstall the extension."), error=True)
            return
        self._pendingInstallUpdate = bool(update) or self.logic.firstUse.next_step().action == "update"
        self._pendingInstall = self.logic.backend.probe_gpu()
        self.setStatus(_("Checking this computer's GPU, memory and disk..."))

    def updateInstall(self) -> None:
        backend = self.logic.backend
        if self._pendingInstall is not None and self._pendingInstall.finished:
            probe, self._pendingInstall = self._pendingInstall, None
            try:
                node = self._parameterNode
                check = self.logic.firstUse.preflight(probe.gpu_name, probe.gpu_memory_gb,
                                                      node.model.strip() if node else None)
                self.firstUseDeviceLabel.text = check.device_summary()
                plan = self.logic.firstUse.install_plan(probe.gpu_name, self._pendingInstallUpdate)
                if check.disk_problems:
                    self.setStatus(check.describe(), error=True)
                    return
                if not slicer.util.confirmOkCancelDisplay(check.describe() + "\n\n" + plan.describe(),
                                                          _("Install the CitrusV backend?")):
                    self.setStatus(_("Installation cancelled: nothing was installed."))
                    return
                if node is not None and node.device == "auto" and check.suggested_device == "cpu":
                    node.device = "cpu"
                backend.start_install(plan)
            except BackendError as error:
                self.setStatus(str(error), error=True)
                return
            self._installReported = None
            self.setStatus(_("Installing the backend (progress in the log below)..."))
        installer = backend.installer
        if installer is None or installer.is_running() or self._installReported is installer:
            return
        self._installReported = installer
        if installer.returncode == 0:
            self.setStatus(_("Backend installed ({what}). Press Start.").format(what=installed_summary(backend.env_dir)))
        elif installer.state == "cancelled":
            self.setStatus(_("Installation cancelled. Press Install to start again."))
        else:
            self.setStatus(explain_failure(list(installer.lines), installer.plan), error=True)

    def onStartBackend(self) -> None:
        """Start only what can start: install, update or download first are offered, never done silently."""
        node = self._parameterNode
        model = node.model.strip() or DEFAULT_MODEL
        step = self.logic.firstUse.next_step(model)
        try:
            if step.action == "install":
                self.setStatus(step.message)
                self.onInstall()
                return
            if step.action == "update" and slicer.util.confirmYesNoDisplay(
                    step.message + "\n\n" + _("Update now? (No: start the installed backend as it is.)"),
                    _("Update the CitrusV backend?")):
                self.setStatus(step.message)
                self.onInstall(update=True)
                return
            if step.action == "update":  # declined: the weights may still be missing
                step = self.logic.firstUse.next_step(model, check_version=False)
            if step.action == "download":
                self.setStatus(step.message, error=True)
                if slicer.util.confirmOkCancelDisplay(step.message, _("Download the model?")):
                    self.onDownload()
                return
            self.logic.backend.start_local(model, node.device)
        except BackendError as error:
            self.setStatus(str(error), error=True)
            return
        self.setStatus(_("Starting the backend with {model} (loading the model can take a minute)...").format(
            model=model))

    def onStopBackend(self) -> None:
        self.logic.backend.stop()  # returns at once; the timer sees it exit (and kills it if it does not)
        self.setStatus(_("Stopping the backend..."))

    def onRestartBackend(self) -> None:
        try:
            self.logic.backend.restart()
        except BackendError as error:
            self.setStatus(str(error), error=True)

    def onTestConnection(self) -> None:
        """A throwaway request to the backend the panel shows now; the local backend and the mode are untouched."""
        try:
            target = self.currentTarget()
        except BackendError as error:
            self.setStatus(str(error), error=True)
            return
        self.setStatus(_("Testing the connection to {url}...").format(url=target.url))
        self.logic.backend.request_status(target, self.onTestConnectionDone)
        self.timer.start(0)

    def onTestConnectionDone(self, text, error) -> None:
        if error is not None:
            self.ui.deviceStatusLabel.text = _("connection failed")
            self.setStatus(str(error), error=True)
            return
        self.ui.deviceStatusLabel.text = text
        self.setStatus(_("Connection works: ") + text)
        if self._parameterNode is not None:  # kept in this machine's history of servers (never the token)
            self.logic.firstUse.settings.remember_url(self._parameterNode.remoteUrl)
            self.logic.firstUse.save()
            self.firstUseUrlCompleter = qt.QCompleter(self.logic.firstUse.settings.remote_urls)
            self.ui.remoteUrlLineEdit.setCompleter(self.firstUseUrlCompleter)

    def onBrowseModel(self) -> None:
        self.browseFolder(self.ui.modelLineEdit)
        self.onMachineSettingEdited()

    def browseFolder(self, lineEdit) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a folder"), lineEdit.text)
        if folder:
            lineEdit.text = folder

    # ------------------------------------------------------------------------------------------ First use

    def setupFirstUse(self) -> None:
        """Download (with progress and Cancel), Cancel for Install, a sample volume, the CA bundle and the device the
        model will use: added to the Backend section here, so the .ui stays as it is. Machine settings
        (CitrusVSlicerLib/settings.py) fill the fields and are saved when edited."""
        layout = self.ui.backendCollapsibleButton.layout()  # the QFormLayout of the Backend section
        buttons = qt.QHBoxLayout()
        self.firstUseDownloadButton = qt.QPushButton(_("Download model"))
        self.firstUseDownloadButton.toolTip = _("Download the model's weights (about 17 GB) into the Hugging Face "
                                                "cache or the weights folder; an interrupted download resumes.")
        self.firstUseCancelDownloadButton = qt.QPushButton(_("Cancel download"))
        self.firstUseCancelInstallButton = qt.QPushButton(_("Cancel install"))
        self.firstUseSampleButton = qt.QPushButton(_("Load sample CT"))
        self.firstUseSampleButton.toolTip = _("Load a chest CT to try the module on (type a prompt, press Apply).")
        for button in (self.firstUseDownloadButton, self.firstUseCancelDownloadButton, self.firstUseCancelInstallButton,
                       self.firstUseSampleButton):
            buttons.addWidget(button)
        layout.addRow(buttons)
        self.firstUseProgressBar = qt.QProgressBar()
        self.firstUseProgressBar.visible = False
        layout.addRow(self.firstUseProgressBar)
        self.firstUseDeviceLabel = qt.QLabel(_("Install checks this computer and says which device the model will "
                                               "use."))
        self.firstUseDeviceLabel.wordWrap = True
        if platform.system() == "Darwin":  # no GPU to probe: the CPU and the RAM it needs, said from the start
            self.firstUseDeviceLabel.text = self.logic.firstUse.preflight(None, None).device_summary()
        layout.addRow(_("Runs on:"), self.firstUseDeviceLabel)
        self.firstUseWeightsLineEdit = qt.QLineEdit(self.logic.firstUse.settings.weights_folder)
        self.firstUseWeightsLineEdit.placeholderText = _("the Hugging Face cache (default)")
        self.firstUseWeightsLineEdit.toolTip = _("Where Download puts the weights (a folder per model); the Model "
                                                 "field is set to it when the download ends.")
        layout.addRow(_("Weights folder:"), self.firstUseWeightsLineEdit)
        self.firstUseCaBundleLineEdit = qt.QLineEdit(self.logic.firstUse.settings.ca_bundle)
        self.firstUseCaBundleLineEdit.placeholderText = _("optional: your organisation's CA bundle (.pem)")
        self.firstUseCaBundleLineEdit.toolTip = _("For networks whose proxy inspects TLS: the installer and the "
                                                  "download trust this CA (plus the system's certificate store).")
        layout.addRow(_("CA bundle:"), self.firstUseCaBundleLineEdit)
        self.firstUseDownloadButton.clicked.connect(self.onDownload)
        self.firstUseCancelDownloadButton.clicked.connect(self.logic.backend.cancel_download)
        self.firstUseCancelInstallButton.clicked.connect(self.onCancelInstall)
        self.firstUseSampleButton.clicked.connect(self.onLoadSample)
        self.firstUseCaBundleLineEdit.connect("editingFinished()", self.onMachineSettingEdited)
        self.firstUseWeightsLineEdit.connect("editingFinished()", self.onMachineSettingEdited)
        self.ui.modelLineEdit.connect("editingFinished()", self.onMachineSettingEdited)
        self.ui.deviceComboBox.connect("activated(int)", lambda index: self.onMachineSettingEdited())
        self.firstUseUrlCompleter = qt.QCompleter(self.logic.firstUse.settings.remote_urls)
        self.ui.remoteUrlLineEdit.setCompleter(self.firstUseUrlCompleter)

    def applyMachineSettings(self, node) -> None:
        """A new scene's parameter node starts from this machine's model, device and last server."""
        settings = self.logic.firstUse.settings
        if node is None:
            return
        if settings.model and node.model == DEFAULT_MODEL:
            node.model = settings.model
        if settings.device != "auto" and node.device == "auto":
            node.device = settings.device
        if settings.remote_urls and not node.remoteUrl:
            node.remoteUrl = settings.remote_urls[0]

    def onMachineSettingEdited(self) -> None:
        settings = self.logic.firstUse.settings
        settings.model = self.ui.modelLineEdit.text.strip()
        settings.device = self.ui.deviceComboBox.currentText
        settings.ca_bundle = self.firstUseCaBundleLineEdit.text.strip()
        settings.weights_folder = self.firstUseWeightsLineEdit.text.strip()
        self.logic.firstUse.save()

    def onDownload(self) -> None:
        node = self._parameterNode
        model = (node.model.strip() if node else "") or DEFAULT_MODEL
        try:
            self.logic.firstUse.start_download(model)
        except BackendError as error:
            self.setStatus(str(error), error=True)
            return
        self._downloadReported = None
        self.firstUseProgressBar.visible = True
        self.firstUseProgressBar.value = 0
        self.setStatus(_("Downloading {model}...").format(model=model))

    def updateDownload(self) -> None:
        download = self.logic.backend.download
        installing = self.logic.backend.installer is not None and self.logic.backend.installer.is_running()
        downloading = download is not None and download.is_running()
        self.firstUseCancelInstallButton.enabled = installing
        self.firstUseCancelDownloadButton.enabled = downloading
        self.firstUseDownloadButton.enabled = not downloading and not installing and not self.isRemote()
        if download is None or self._downloadReported is download:
            return
        if downloading:
            if download.progress and download.progress.fraction is not None:
                self.firstUseProgressBar.value = int(100 * download.progress.fraction)
            self.setStatus(download.status_text())
            return
        self._downloadReported = download
        self.firstUseProgressBar.visible = False
        folder = self.logic.firstUse.download_finished()
        if folder and self._parameterNode is not None:
            self._parameterNode.model = folder
        self.setStatus(download.status_text(), error=download.state == "failed")

    def onCancelInstall(self) -> None:
        if self.logic.backend.installer is not None:
            self.logic.backend.installer.request_stop()
            self.setStatus(_("Cancelling the installation..."))

    def onLoadSample(self) -> None:
        """The chest CT of the backend environment (no download); else Slicer's own sample data."""
        path = self.logic.firstUse.sample_volume()
        if path is not None:
            volume = slicer.util.loadVolume(str(path))
        else:
            import SampleData

            volume = SampleData.downloadSample("CTChest")
        if volume is not None and self._parameterNode is not None:
            self._parameterNode.inputVolume = volume
            if not self._parameterNode.prompt.strip():
                self._parameterNode.prompt = "segment the left lung"
            self.setStatus(_("Sample chest CT loaded: press Apply."))

    # ------------------------------------------------------------------------------------------ Batch

    def onRunBatch(self) -> None:
        node = self._parameterNode
        backend = self.logic.backend
        conflict = backend.batch_conflict(node.device)
        if conflict:
            choice = qt.QMessageBox.question(
                slicer.util.mainWindow(), _("A second model on the same GPU?"),
                conflict + "\n\n" + _("Stop the interactive backend and run the batch?"),
                qt.QMessageBox.Yes | qt.QMessageBox.Ignore | qt.QMessageBox.Cancel, qt.QMessageBox.Yes)
            if choice == qt.QMessageBox.Cancel:
                return
            if choice == qt.QMessageBox.Yes:
                backend.stop()
        try:
            backend.start_batch(node.batchInputFolder, node.batchOutputFolder, node.task.lower(), node.prompt,
                                node.model.strip() or DEFAULT_MODEL, node.device, self.logic.taskOptions(node))
        except (BackendError, ValueError) as error:
            self.ui.batchStatusLabel.text = str(error)
            return
        self.ui.batchProgressBar.value = 0
        self.ui.batchStatusLabel.text = _("Starting the batch...")

    def onCancelBatch(self) -> None:
        if self.logic.backend.batch is not None:
            self.logic.backend.batch.request_stop()

    def updateBatch(self) -> None:
        batch = self.logic.backend.batch
        if batch is None:
            return
        progress = batch.progress
        if progress.total:
            self.ui.batchProgressBar.value = int(100 * (progress.done + progress.failed) / progress.total)
        self.ui.batchStatusLabel.text = progress.summary()
        # The run knows its own output folder: no parameter node needed (there is none after a scene close).
        self.ui.batchOpenResultsButton.enabled = not batch.is_running() and bool(batch.output_folder)

    def onOpenBatchResults(self) -> None:
        batch = self.logic.backend.batch
        if batch is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(batch.output_folder))


#
# CitrusVSlicerLogic
#


class CitrusVSlicerLogic(ScriptedLoadableModuleLogic, ModuleLogic):
    """What the panel does, callable from scripts too (CitrusVSlicerLib/logic.py), plus what needs Slicer's app."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # One manager per Slicer session: a Reload of the module finds the running backend instead of a new one.
        ModuleLogic.__init__(self, session_manager(os.path.dirname(os.path.abspath(__file__))), slicer.mrmlScene,
                             slicer.app.processEvents, lambda: getattr(slicer, "dicomDatabase", None))
        # This machine's settings (model, weights, device, environment, servers) in Slicer's QSettings.
        self.firstUse = FirstUse(self.backend, qt.QSettings())

    def getParameterNode(self) -> CitrusVSlicerParameterNode:
        return CitrusVSlicerParameterNode(super().getParameterNode())

    def installQuitHook(self) -> None:
        """Stop everything with Slicer (once per session, however often the module is reloaded)."""
        if not getattr(self.backend, "quit_hook_installed", False):
            slicer.app.aboutToQuit.connect(self.backend.shutdown)
            self.backend.quit_hook_installed = True

    @staticmethod
    def taskOptions(node: CitrusVSlicerParameterNode) -> dict:
        return task_options(node.mode, node.window, node.axis, node.sliceRange, node.maxPixels)

    def exportDicom(self, target, volumeNode, segmentationNode, onDone) -> None:
        """The segments as they are in the scene (edits included) as DICOM SEG + SR written by the backend, imported
        into Slicer's DICOM database (CitrusVSlicerLib/scene_export.py says why not QuantitativeReporting's
        exporter, and when it refuses). `onDone(done, error)` runs once they are imported, or with the reason."""
        from DICOMLib import DICOMUtils

        directory = Path(slicer.app.temporaryPath) / f"CitrusV-DICOM-{time.strftime('%Y%m%d-%H%M%S')}"
        # copyFiles: the database keeps its own copies, the temporary folder may go.
        self.startDicomExport(target, volumeNode, segmentationNode, directory,
                              lambda folder: DICOMUtils.importDicom(folder, copyFiles=True), onDone)


#
# CitrusVSlicerTest
#


class CitrusVSlicerTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer (run by .github/workflows/slicer.yml against Slicer 5.10 on Linux).

    The full flow needs the backend environment: CITRUSV_TEST_PYTHON names an existing one's python, or with
    CITRUSV_TEST_INSTALL=1 the module installs it (CITRUSV_BASE_PYTHON: the Python to build it with). The model is
    CITRUSV_TEST_MODEL (default: the random tiny one, made by the backend itself)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ParameterNodeKeepsSettings()
        self.setUp()
        self.test_PanelBindingsAndSessionManager()
        self.setUp()
        self.test_FullFlowWithTinyModel()

    def test_ParameterNodeKeepsSettings(self):
        self.delayDisplay("Parameter node")
        logic = CitrusVSlicerLogic()
        parameterNode = logic.getParameterNode()
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CitrusVTestVolume")
        parameterNode.inputVolume = volumeNode
        parameterNode.prompt = "segment the liver"
        parameterNode.mode = "hybrid"
        reloaded = CitrusVSlicerLogic().getParameterNode()
        self.assertEqual(reloaded.inputVolume.GetID(), volumeNode.GetID())
        self.assertEqual(reloaded.prompt, "segment the liver")
        self.assertEqual(reloaded.mode, "hybrid")
        slicer.mrmlScene.RemoveNode(volumeNode)
        self.assertIsNone(reloaded.inputVolume)

    def test_PanelBindingsAndSessionManager(self):
        self.delayDisplay("Panel")
        slicer.util.selectModule("CitrusVSlicer")
        widget = slicer.modules.citrusvslicer.widgetRepresentation().self()
        spinBox = widget.ui.maxPixelsSpinBox
        self.assertEqual((spinBox.minimum, spinBox.maximum), (0, PIXEL_BUDGET_MAX))  # the connector kept the bounds
        self.assertIs(CitrusVSlicerLogic().backend, widget.logic.backend)       # one manager per session
        # The first-use row built in code (not in the .ui): PythonQt's QFormLayout took it.
        self.assertTrue(widget.firstUseDownloadButton.parent() is not None and widget.firstUseDeviceLabel.text)

    def test_FullFlowWithTinyModel(self):
        """Install if asked, start the backend with the tiny model, segment a phantom, check what was written,
        refine the segment once and undo it (the steps: CitrusVSlicerLib/selftest.py)."""
        logic = CitrusVSlicerLogic()
        backend = logic.backend
        if os.environ.get("CITRUSV_TEST_PYTHON"):
            backend._python_override = os.environ["CITRUSV_TEST_PYTHON"]
        if backend.needs_install() and os.environ.get("CITRUSV_TEST_INSTALL") == "1":
            self.delayDisplay("Installing the backend")
            logic.installBackend(os.environ.get("CITRUSV_BASE_PYTHON"))
        if backend.needs_install():
            self.delayDisplay("Backend not installed: full-flow test skipped (set CITRUSV_TEST_PYTHON or "
                              "CITRUSV_TEST_INSTALL=1 to run it)")
            return
        volumeNode = slicer.util.addVolumeFromArray(selftest.phantom(), ijkToRAS=selftest.PHANTOM_IJK_TO_RAS,
                                                    name="CitrusVPhantom")
        backend.start_local(os.environ.get("CITRUSV_TEST_MODEL", "tiny"), "cpu")
        try:
            logic.waitForBackend(600)
            written = selftest.apply_and_check(logic, volumeNode)
            self.delayDisplay("Refine: an exclude point, then Undo")
            selftest.refine_and_undo(logic, backend.local_target(), volumeNode, written["segmentation"],
                                     written["segment_ids"][0])
        finally:
            backend.stop()
            deadline = time.monotonic() + 30
            while backend.process.is_running() and time.monotonic() < deadline:
                backend.poll()
                time.sleep(0.1)
        self.delayDisplay("Full flow passed")
