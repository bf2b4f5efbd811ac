"""CitrusV module: text-prompted segmentation, detection and reports with the Citrus-V model.

This file stays thin (module description, parameter node, widget wiring, self-test): the panel's sections are mixins
in CitrusVSlicerPanels, and the work lives in CitrusVSlicerLib, which imports without Qt and is tested headlessly.
All I/O is asynchronous and runs outside Slicer's process (the backend server, the installer, batch runs, and the
HTTP courier that does every request): one timer on the main thread polls it, so the panel never waits on the
network, a child process or a Python thread (PythonQt never releases the GIL while Qt's event loop runs).
See CitrusVSlicerLib/transport.py for the design.
"""

import os
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
from CitrusVSlicerLib.logic import ModuleLogic
from CitrusVSlicerLib.manager import session_manager
from CitrusVSlicerLib import selftest
from CitrusVSlicerLib.backend_options import AXES, MODES, PIXEL_BUDGET_MAX, WINDOWS
from CitrusVSlicerLib.options import task_options
from CitrusVSlicerLib.requirements import RELEASED_MODEL as DEFAULT_MODEL
from CitrusVSlicerPanels.backend import BackendPanel
from CitrusVSlicerPanels.batch import BatchPanel
from CitrusVSlicerPanels.conversation import ConversationPanel
from CitrusVSlicerPanels.first_use import FirstUsePanel
from CitrusVSlicerPanels.refine import RefinePanel
from CitrusVSlicerPanels.results import ResultsPanel

TASKS = ["Segment", "Detect", "Report", "Ask"]
BACKEND_MODES = ["Local (this computer)", "Remote (server)"]
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


class CitrusVSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin, BackendPanel, FirstUsePanel, RefinePanel,
                          ResultsPanel, ConversationPanel, BatchPanel):
    """The panel: widgets bound to the parameter node; one timer advances everything that runs outside Slicer.
    Here: setup, the state every section reads, the timer, Apply; each other section is a mixin of its own
    (CitrusVSlicerPanels/), whose state is set up in __init__ below so all of it is in one place."""

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
