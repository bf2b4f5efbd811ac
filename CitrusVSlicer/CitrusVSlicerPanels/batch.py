"""The Batch section: a folder of volumes run by a separate `citrusv batch` process (CitrusVSlicerLib/batch.py)."""

import qt

import slicer
from slicer.i18n import tr as _

from CitrusVSlicerLib.endpoints import BackendError
from CitrusVSlicerLib.requirements import RELEASED_MODEL as DEFAULT_MODEL


class BatchPanel:
    """Start, cancel and follow a batch run, and open its results.
    A mixin of CitrusVSlicerWidget (self.ui, self.logic, self._parameterNode, self.timer are the widget's)."""

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
