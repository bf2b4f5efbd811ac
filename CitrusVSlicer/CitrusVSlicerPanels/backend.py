"""The Backend section: local or remote, install / start / stop / restart the local backend, test a connection."""

import qt

import slicer
from slicer.i18n import tr as _

from CitrusVSlicerLib.endpoints import BackendError
from CitrusVSlicerLib.installer import explain_failure, installed_summary
from CitrusVSlicerLib.requirements import RELEASED_MODEL as DEFAULT_MODEL


class BackendPanel:
    """The backend's lifecycle as the user drives it; each step says what it did or why it could not.
    A mixin of CitrusVSlicerWidget (self.ui, self.logic, self._parameterNode, self.timer are the widget's)."""

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
