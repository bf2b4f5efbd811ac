"""CitrusV module: text-prompted segmentation, detection and reports with the Citrus-V model.

This file stays thin (module description, parameter node, widget wiring, self-test); the work that can run
without Qt lives in CitrusVSlicerLib so that it can be tested headlessly.
"""

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import qt

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CitrusVSlicerLib.batch import BatchRun
from CitrusVSlicerLib.client import BackendError
from CitrusVSlicerLib.dicom_export import dicom_reference, export_result, slicer_seg_exporter
from CitrusVSlicerLib.installer import explain_failure
from CitrusVSlicerLib.manager import REMOTE, BackendManager
from CitrusVSlicerLib.runner import ApplyRunner
from CitrusVSlicerLib.writers import volume_array_and_geometry, write_result

TASKS = ["Segment", "Detect", "Report", "Ask"]
BACKEND_MODES = ["Local (this computer)", "Remote (server)"]
DEFAULT_MODEL = "jdh-algo/Citrus-V-8B-v1.0"
TIMER_MS = 200

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
    mode: Annotated[str, Choice(["propagate", "per-slice", "hybrid"])] = "propagate"
    window: Annotated[str, Choice(["auto", "soft_tissue", "lung", "bone", "brain", "liver"])] = "auto"
    sliceAxis: Annotated[str, Choice(["axial", "coronal", "sagittal"])] = "axial"
    sliceRange: str = ""
    maxPixels: int = 0


#
# CitrusVSlicerWidget
#


class CitrusVSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: widgets bound to the parameter node; a timer moves backend news onto the main thread."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runner = None
        self._lastResult = None   # the last Apply's SceneResult (its DICOM objects for the export button)
        self._batch = None
        self._consentedUrls = set()
        self._promptHistory = []

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
        self.ui.installBackendButton.clicked.connect(self.onInstall)
        self.ui.startBackendButton.clicked.connect(self.onStartBackend)
        self.ui.stopBackendButton.clicked.connect(self.onStopBackend)
        self.ui.restartBackendButton.clicked.connect(self.onRestartBackend)
        self.ui.testConnectionButton.clicked.connect(self.onTestConnection)
        self.ui.modelBrowseButton.clicked.connect(self.onBrowseModel)
        self.ui.backendModeComboBox.connect("currentIndexChanged(int)", lambda index: self.updateGui())
        self.ui.batchInputBrowseButton.clicked.connect(lambda: self.browseFolder(self.ui.batchInputLineEdit))
        self.ui.batchOutputBrowseButton.clicked.connect(lambda: self.browseFolder(self.ui.batchOutputLineEdit))
        self.ui.batchRunButton.clicked.connect(self.onRunBatch)
        self.ui.batchCancelButton.clicked.connect(self.onCancelBatch)
        self.ui.batchOpenResultsButton.clicked.connect(self.onOpenBatchResults)
        self.ui.exportDicomButton.clicked.connect(self.onExportDicom)

        self.timer = qt.QTimer()
        self.timer.setInterval(TIMER_MS)
        self.timer.timeout.connect(self.onTimer)
        self.timer.start()
        slicer.app.aboutToQuit.connect(self.logic.shutdown)  # the backend stops with Slicer
        self.initializeParameterNode()
        self.updateGui()

    def cleanup(self) -> None:
        self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
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

    def updateGui(self) -> None:
        busy = self._runner is not None and self._runner.state in ("running", "cancelling")
        state = self.logic.backend.state
        ready = state in ("running", REMOTE) or self.isRemote()
        self.ui.applyButton.enabled = ready and not busy
        self.ui.applyButton.toolTip = "" if ready else _("Start the backend first (Backend section)")
        self.ui.cancelButton.enabled = busy
        local = not self.isRemote()
        for widget in (self.ui.modelLineEdit, self.ui.modelBrowseButton, self.ui.deviceComboBox, self.ui.installBackendButton,
                       self.ui.startBackendButton, self.ui.stopBackendButton, self.ui.restartBackendButton):
            widget.enabled = local
        self.ui.remoteUrlLineEdit.enabled = not local
        self.ui.remoteTokenLineEdit.enabled = not local
        self.ui.stopBackendButton.enabled = local and state in ("starting", "running")
        self.ui.restartBackendButton.enabled = local and state in ("running", "crashed", "exited")
        batchBusy = self._batch is not None and self._batch.is_running()
        self.ui.batchRunButton.enabled = not batchBusy
        self.ui.batchCancelButton.enabled = batchBusy
        self.ui.exportDicomButton.enabled = not busy and bool(self._lastResult and self._lastResult.dicom)

    def setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")

    def onTimer(self) -> None:
        for line in self.logic.backend.drain_logs():
            self.ui.backendLogTextEdit.appendPlainText(line)
        self.updateBackendStatus()
        if self._runner is not None:
            for event in self._runner.events():
                self.onRunnerEvent(event)
        if self._batch is not None:
            self.updateBatch()
        self.updateGui()

    def updateBackendStatus(self) -> None:
        state = self.logic.backend.state
        if state == "crashed" and self.ui.deviceStatusLabel.text != "crashed":
            self.setStatus(_("The backend stopped unexpectedly: see its log below, then press Restart."), error=True)
        if state == "running" and not getattr(self, "_statusShownFor", None) == self.logic.backend.process:
            self._statusShownFor = self.logic.backend.process
            try:
                self.ui.deviceStatusLabel.text = self.logic.backend.device_status()
            except BackendError as error:
                self.ui.deviceStatusLabel.text = str(error)
            self.setStatus(_("Backend ready."))
        elif state not in ("running",):
            self.ui.deviceStatusLabel.text = state

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
        if self._runner is not None and self._runner.state in ("running", "cancelling"):
            return
        node = self._parameterNode
        if not node.inputVolume:
            self.setStatus(_("Choose an input volume."), error=True)
            return
        if node.task != "Report" and not node.prompt.strip():
            self.setStatus(_("Type a prompt, e.g. 'segment the liver'."), error=True)
            return
        try:
            if self.isRemote():
                self.logic.backend.use_remote(node.remoteUrl, self.ui.remoteTokenLineEdit.text)
                if self.logic.backend.remote_needs_consent() and not self.askConsent(node.remoteUrl):
                    self.setStatus(_("Cancelled: no image data was sent."))
                    return
            self._runner = self.logic.startTask(node.inputVolume, node.task.lower(), node.prompt, self.logic.taskOptions(node))
        except (BackendError, ValueError) as error:
            self.setStatus(str(error), error=True)
            return
        self.rememberPrompt(node.prompt)
        self.ui.progressBar.value = 0
        self.setStatus(_("Working..."))
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
        if self._runner is not None:
            self._runner.cancel()
            self.setStatus(_("Cancelling..."))

    def onRunnerEvent(self, event) -> None:
        if event.kind == "progress":
            self.ui.progressBar.value = int(100 * event.fraction)
            self.setStatus(f"{event.stage}: {event.message}" if event.message else event.stage)
        elif event.kind == "done":
            node = self._parameterNode
            with slicer.util.tryWithErrorDisplay(_("Writing the results failed."), waitCursor=True):
                written = self.logic.writeResult(node.inputVolume, event.result, node.outputSegmentation,
                                                 node.outputTable, node.replaceExistingSegments)
                node.outputSegmentation = written["segmentation"] or node.outputSegmentation
                node.outputTable = written["table"] or node.outputTable
            self._lastResult = event.result
            self.ui.answerTextEdit.setPlainText(event.result.report_text)
            self.ui.progressBar.value = 100
            found = len(event.result.segments)
            self.setStatus(_("Done: {n} segment(s), {f} finding(s), {b} box(es).").format(
                n=found, f=len(event.result.findings), b=len(event.result.boxes))
                + (" " + _("RANDOM TEST WEIGHTS: results are noise.") if event.result.random_weights else ""))
        elif event.kind == "error":
            self.ui.progressBar.value = 0
            self.setStatus(event.message, error=True)
        elif event.kind == "cancelled":
            self.ui.progressBar.value = 0
            self.setStatus(_("Cancelled."))

    def onExportDicom(self) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("DICOM export failed."), waitCursor=True):
            done = self.logic.exportDicom(self._lastResult, node.outputSegmentation)
            self.setStatus(_("Exported {n} DICOM file(s) into the DICOM database (segmentation by {route}).").format(
                n=len(done["files"]), route=done["segmentation_exported_by"]))

    # ------------------------------------------------------------------------------------------ Backend

    def onInstall(self) -> None:
        try:
            plan = self.logic.backend.install_plan()
        except BackendError as error:
            self.setStatus(str(error), error=True)
            return
        if not slicer.util.confirmOkCancelDisplay(plan.describe(), _("Install the CitrusV backend?")):
            return
        try:
            self.logic.backend.start_install(plan)
        except BackendError as error:
            self.setStatus(str(error), error=True)
            return
        self._installPlan = plan
        self.setStatus(_("Installing the backend (progress in the log below)..."))
        qt.QTimer.singleShot(1000, self.checkInstall)

    def checkInstall(self) -> None:
        installer = self.logic.backend.installer
        if installer is None:
            return
        if installer.is_running():
            qt.QTimer.singleShot(1000, self.checkInstall)
            return
        if installer.returncode == 0:
            self.setStatus(_("Backend installed. Press Start."))
        else:
            self.setStatus(explain_failure(list(installer.lines), self._installPlan), error=True)

    def onStartBackend(self) -> None:
        node = self._parameterNode
        try:
            if self.logic.backend.needs_install():
                self.onInstall()
                return
            self.logic.backend.start_local(node.model.strip() or DEFAULT_MODEL, node.device)
        except BackendError as error:
            self.setStatus(str(error), error=True)
            return
        self.setStatus(_("Starting the backend (loading the model can take a minute)..."))

    def onStopBackend(self) -> None:
        self.logic.backend.stop()
        self.setStatus(_("Backend stopped."))

    def onRestartBackend(self) -> None:
        try:
            self.logic.backend.restart()
        except BackendError as error:
            self.setStatus(str(error), error=True)

    def onTestConnection(self) -> None:
        try:
            if self.isRemote():
                self.logic.backend.use_remote(self._parameterNode.remoteUrl, self.ui.remoteTokenLineEdit.text)
            status = self.logic.backend.device_status()
        except BackendError as error:
            self.setStatus(str(error), error=True)
            return
        self.ui.deviceStatusLabel.text = status
        self.setStatus(_("Connection works: ") + status)

    def onBrowseModel(self) -> None:
        self.browseFolder(self.ui.modelLineEdit)

    def browseFolder(self, lineEdit) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a folder"), lineEdit.text)
        if folder:
            lineEdit.text = folder

    # ------------------------------------------------------------------------------------------ Batch

    def onRunBatch(self) -> None:
        node = self._parameterNode
        try:
            self._batch = self.logic.startBatch(node.batchInputFolder, node.batchOutputFolder, node.task.lower(),
                                                node.prompt, node.model.strip() or DEFAULT_MODEL, node.device,
                                                self.logic.taskOptions(node))
        except (BackendError, ValueError) as error:
            self.ui.batchStatusLabel.text = str(error)
            return
        self.ui.batchProgressBar.value = 0
        self.ui.batchStatusLabel.text = _("Starting the batch...")

    def onCancelBatch(self) -> None:
        if self._batch is not None:
            self._batch.stop()

    def updateBatch(self) -> None:
        for line in self._batch.drain():
            self.ui.backendLogTextEdit.appendPlainText(line)
        progress = self._batch.progress
        if progress.total:
            self.ui.batchProgressBar.value = int(100 * (progress.done + progress.failed) / progress.total)
        self.ui.batchStatusLabel.text = progress.summary()
        if not self._batch.is_running():
            self.ui.batchOpenResultsButton.enabled = bool(self._parameterNode.batchOutputFolder)

    def onOpenBatchResults(self) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self._parameterNode.batchOutputFolder))


#
# CitrusVSlicerLogic
#


class CitrusVSlicerLogic(ScriptedLoadableModuleLogic):
    """What the panel does, callable from scripts too: backend lifecycle, tasks, writing results."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.backend = BackendManager(os.path.dirname(os.path.abspath(__file__)))
        self._uploads = {}

    def getParameterNode(self) -> CitrusVSlicerParameterNode:
        return CitrusVSlicerParameterNode(super().getParameterNode())

    @staticmethod
    def taskOptions(node: CitrusVSlicerParameterNode) -> dict:
        options = {"mode": node.mode, "window": node.window, "axis": node.sliceAxis}
        if node.sliceRange.strip():
            try:
                first, last = (int(part) for part in node.sliceRange.split(":"))
            except ValueError:
                raise ValueError(_("Slice range must be FIRST:LAST, e.g. 10:40.")) from None
            options["slice_range"] = [first, last]
        if node.maxPixels:
            options["max_pixels"] = node.maxPixels
        return options

    def startTask(self, volumeNode, task: str, prompt: str, options: dict) -> ApplyRunner:
        """Upload (once per volume content and backend), submit, follow: all in a background thread."""
        client = self.backend.client()
        voxels, ijkToRas = volume_array_and_geometry(volumeNode)
        # From Slicer's DICOM database: the upload says which series it is, so the backend makes DICOM SEG/SR.
        reference = dicom_reference(volumeNode, ijkToRas, getattr(slicer, "dicomDatabase", None))
        key = (client.url, volumeNode.GetID(), volumeNode.GetImageData().GetMTime(), ijkToRas.tobytes(),
               reference is not None)
        runner = ApplyRunner(client, voxels.copy(), ijkToRas, volumeNode.GetName(), task, prompt, options,
                             volume_id=self._uploads.get(key), dicom_reference=reference)
        runner.on_uploaded = lambda volumeId: self._uploads.__setitem__(key, volumeId)
        runner.start()
        return runner

    def exportDicom(self, result, segmentationNode=None) -> dict:
        """The result's SEG and SR into Slicer's DICOM database, through Slicer's own DICOM SEG exporter when the
        QuantitativeReporting extension provides it (the segmentation as edited), else the backend's SEG."""
        from DICOMLib import DICOMUtils

        exporter = slicer_seg_exporter(getattr(slicer.modules, "dicomPlugins", {}))
        item = None
        if exporter is not None and segmentationNode is not None:
            item = slicer.mrmlScene.GetSubjectHierarchyNode().GetItemByDataNode(segmentationNode)
        directory = Path(slicer.app.temporaryPath) / f"CitrusV-DICOM-{time.strftime('%Y%m%d-%H%M%S')}"
        # copyFiles: the database keeps its own copies, the temporary folder may go.
        return export_result(self.backend.client(), result.dicom if result else None, directory,
                             lambda folder: DICOMUtils.importDicom(folder, copyFiles=True), exporter, item)

    def writeResult(self, volumeNode, result, segmentationNode=None, tableNode=None, replaceExisting=False) -> dict:
        return write_result(slicer.mrmlScene, volumeNode, result, segmentationNode, tableNode, replaceExisting)

    def process(self, volumeNode, task: str, prompt: str, options: Optional[dict] = None, timeout: float = 600.0) -> dict:
        """Blocking run for scripts and the self-test: returns the written nodes."""
        runner = self.startTask(volumeNode, task, prompt, options or {})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in runner.events():
                if event.kind == "done":
                    return self.writeResult(volumeNode, event.result)
                if event.kind in ("error", "cancelled"):
                    raise RuntimeError(event.message)
            slicer.app.processEvents()
            time.sleep(0.1)
        runner.cancel()
        raise RuntimeError(f"no result within {timeout:.0f} s")

    def startBatch(self, inputFolder: str, outputFolder: str, task: str, prompt: str, model: str, device: str,
                   options: dict) -> BatchRun:
        if self.backend.needs_install():
            raise BackendError(_("Install the backend first (Backend section)."))
        run = BatchRun(self.backend.python, inputFolder, outputFolder, task, prompt, model, device, options)
        run.start()
        return run

    def shutdown(self) -> None:
        self.backend.stop()


#
# CitrusVSlicerTest
#


class CitrusVSlicerTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer. The full flow needs the installed backend (or CITRUSV_TEST_PYTHON)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ParameterNodeKeepsSettings()
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

    def test_FullFlowWithTinyModel(self):
        """Start the backend with the random tiny model, segment a phantom, check the segmentation's geometry."""
        import numpy as np

        logic = CitrusVSlicerLogic()
        python = os.environ.get("CITRUSV_TEST_PYTHON")
        if python:
            logic.backend = BackendManager(logic.backend.module_dir, python=python)
        if logic.backend.needs_install():
            self.delayDisplay("Backend not installed: full-flow test skipped (set CITRUSV_TEST_PYTHON to run it)")
            return
        phantom = np.full((24, 64, 64), -1000, np.int16)
        phantom[8:16, 20:44, 16:40] = 60
        ijkToRAS = np.array([[-1.5, 0, 0, 40], [0, -1.5, 0, 30], [0, 0, 4, -50], [0, 0, 0, 1]])
        volumeNode = slicer.util.addVolumeFromArray(phantom, ijkToRAS=ijkToRAS, name="CitrusVPhantom")
        logic.backend.start_local("tiny", "cpu")
        try:
            self.assertTrue(logic.backend.process.wait_ready(300), "the backend did not start")
            written = logic.process(volumeNode, "segment", "segment the liver", {"slice_range": [8, 12]})
            segmentation = written["segmentation"]
            self.assertIsNotNone(segmentation)
            self.assertEqual(segmentation.GetNodeReference("CitrusVSourceVolume").GetID(), volumeNode.GetID())
            self.assertIsNotNone(written["table"])
        finally:
            logic.shutdown()
        self.delayDisplay("Full flow passed")
