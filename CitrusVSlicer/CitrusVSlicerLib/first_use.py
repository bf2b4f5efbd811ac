"""The first hour, as the panel walks it: machine settings, what Start must do first, the preflight, the download,
and a sample volume to try. Qt-free: the panel (and scripts, and tests) drive it.

Start never installs or downloads silently: `next_step(model)` says whether the environment must be installed or
updated, or the weights downloaded, before the backend can start — each with the message the panel shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .install_platform import CA_VARIABLES, tls_environment, update_offer
from .preflight import MachineFacts, Preflight, preflight, total_ram_gb
from .requirements import KNOWN_MODELS, RELEASED_MODEL, model_need
from .settings import MachineSettings, SettingsStore
from .weights import hub_cache_dir, looks_like_hub_id

SAMPLE_NAME = "CTChest4.nrrd"   # the chest CT slicerio ships (a backend dependency): 128x128x34, 3 x 3 x 10 mm


@dataclass
class StartStep:
    action: str     # "install", "update", "download" or "start"
    message: str


class FirstUse:
    def __init__(self, manager, store: SettingsStore):
        self.manager = manager
        self.store = store
        self.settings = MachineSettings.load(store)
        self.apply_settings()

    # ------------------------------------------------------------------------------------------ settings

    def apply_settings(self) -> None:
        """Where the environment is and how to reach the network follow the settings."""
        if self.settings.environment_folder.strip():
            self.manager.env_dir = Path(self.settings.environment_folder.strip()).expanduser()
        # The backend's children get the CA bundle (uv's switches only matter to the installer, which sets them).
        for name in CA_VARIABLES:
            self.manager.extra_env.pop(name, None)
        ca = self.settings.ca_bundle.strip()
        if ca:
            self.manager.extra_env.update({k: v for k, v in tls_environment(ca).items() if k in CA_VARIABLES})

    def save(self) -> None:
        self.settings.save(self.store)
        self.apply_settings()

    @property
    def model(self) -> str:
        return self.settings.model.strip() or RELEASED_MODEL

    # ------------------------------------------------------------------------------------------ Start

    def next_step(self, model: str | None = None, check_version: bool = True) -> StartStep:
        """`check_version=False`: the user chose to keep an older backend for now."""
        model = (model or self.model).strip()
        manager = self.manager
        if manager.needs_install():
            return StartStep("install", "The backend is not installed yet: press Install (it checks this computer and "
                                        "asks before installing anything).")
        offer = None if manager._python_override or not check_version else \
            update_offer(manager.backend_dir, manager.env_dir)
        if offer:
            return StartStep("update", offer)
        check = manager.weights(model)
        if not check.present:
            source = " from the Hugging Face hub" if check.is_hub_id else ""
            size = f" (about {KNOWN_MODELS[model].weights_gb:.0f} GB)" if model in KNOWN_MODELS else ""
            return StartStep("download", f"The model is not on this computer: {check.missing}. Press Download to "
                                         f"fetch it{source}{size}, or choose a folder with the weights with Browse....")
        return StartStep("start", "")

    def install_plan(self, gpu_name: str | None, update: bool = False):
        return self.manager.install_plan(gpu_name, self.settings.backend_python.strip() or None,
                                         ca_bundle=self.settings.ca_bundle.strip(), update=update)

    # ------------------------------------------------------------------------------------------ preflight

    def weights_destination(self, model: str | None = None) -> Path | None:
        """Where Download puts the weights (None: they are here already)."""
        model = model or self.model
        if self.manager.weights(model).present:
            return None
        if self.settings.weights_folder.strip():
            return Path(self.settings.weights_folder.strip()).expanduser()
        return hub_cache_dir() if looks_like_hub_id(model) else Path(model).expanduser()

    def preflight(self, gpu_name: str | None, gpu_memory_gb: float | None, model: str | None = None,
                  ram_gb: float | None = None, free_disk=None) -> Preflight:
        model = model or self.model
        facts = MachineFacts(gpu_name, gpu_memory_gb, ram_gb if ram_gb is not None else total_ram_gb())
        env_dir = None if not self.manager.needs_install() else self.manager.env_dir
        options = {"free_disk": free_disk} if free_disk is not None else {}
        return preflight(facts, model_need(model), env_dir, self.weights_destination(model), **options)

    # ------------------------------------------------------------------------------------------ download

    def start_download(self, model: str | None = None):
        model = model or self.model
        destination = self.settings.weights_folder.strip() or None
        if destination and looks_like_hub_id(model):
            destination = str(Path(destination).expanduser() / Path(model).name)
        return self.manager.start_download(model, destination)

    def download_finished(self) -> str | None:
        """After a successful download into a folder of the user's choice, the model setting becomes that folder
        (Start then needs neither the hub nor the network). Returns the model now set, or None."""
        download = self.manager.download
        if download is None or download.state != "done" or not download.destination:
            return None
        self.settings.model = download.path
        self.save()
        return download.path

    # ------------------------------------------------------------------------------------------ sample

    def sample_volume(self) -> Path | None:
        """The chest CT that the backend environment's slicerio ships (no download), or None."""
        env_dir = Path(self.manager.env_dir)
        for site in list(env_dir.glob("lib/python*/site-packages")) + [env_dir / "Lib" / "site-packages"]:
            candidate = site / "slicerio" / "data" / SAMPLE_NAME
            if candidate.is_file():
                return candidate
        if self.manager._python_override:   # a developer's environment (tests): its own slicerio
            python = Path(self.manager._python_override)
            for site in python.parent.parent.glob("lib/python*/site-packages"):
                candidate = site / "slicerio" / "data" / SAMPLE_NAME
                if candidate.is_file():
                    return candidate
        return None
