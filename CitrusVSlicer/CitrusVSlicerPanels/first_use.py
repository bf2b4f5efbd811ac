"""First use, added to the Backend section: download the model, cancel an install, load a sample CT, and this
machine's settings (model, device, weights folder, CA bundle, servers; CitrusVSlicerLib/settings.py)."""

import platform

import qt

import slicer
from slicer.i18n import tr as _

from CitrusVSlicerLib.endpoints import BackendError
from CitrusVSlicerLib.requirements import RELEASED_MODEL as DEFAULT_MODEL


class FirstUsePanel:
    """From a fresh install to a first Apply: the widgets the .ui does not have, and the machine's settings.
    A mixin of CitrusVSlicerWidget (self.ui, self.logic, self._parameterNode, self.timer are the widget's)."""

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
