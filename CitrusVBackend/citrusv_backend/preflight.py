"""`citrusv download --check`: what the model needs (GPU memory in bf16, RAM in fp32, disk) beside what this
machine has, and one sentence saying what fits — the numbers a launcher shows before it downloads 17 GB."""
from __future__ import annotations

import os
import platform
from pathlib import Path

from .model.hub import is_hub_id
from .model.requirements import GB, RELEASED_NEED, MemoryNeed, gb_text, need_of_checkpoint


def total_ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (AttributeError, ValueError, OSError):  # Windows
        pass
    try:
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                        ("available", ctypes.c_ulonglong), ("page_total", ctypes.c_ulonglong),
                        ("page_available", ctypes.c_ulonglong), ("virtual_total", ctypes.c_ulonglong),
                        ("virtual_available", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]

        status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
        return status.total / GB
    except Exception:
        return None


def cuda_gpu() -> dict | None:
    """The first CUDA GPU torch can use: name and total memory; None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return {"name": properties.name, "total_gb": round(properties.total_memory / GB, 1)}


def advice(need: MemoryNeed, gpu: dict | None, ram_gb: float | None, system: str) -> tuple[str, str]:
    """(the device the model would use, one sentence about what fits)."""
    ram = f"this machine has {gb_text(ram_gb)} GB" if ram_gb else "this machine's RAM is unknown"
    cpu_fits = ram_gb is None or ram_gb >= need.cpu_ram_gb
    cpu = (f"the CPU (float32: needs about {gb_text(need.cpu_ram_gb)} GB of RAM, {ram}"
           f"{'' if cpu_fits else ': too little'}; minutes per image)")
    if system == "Darwin":
        return "cpu", (f"On macOS the model runs on {cpu}; Apple's GPU (MPS) is not used, as it has not been shown to "
                       f"give this model's results. A remote server with an NVIDIA GPU is much faster.")
    if gpu is None:
        return "cpu", f"No usable NVIDIA GPU: the model runs on {cpu}, or use a remote server."
    if gpu["total_gb"] >= need.gpu_gb:
        return "cuda", (f"This GPU ({gpu['name']}) has {gb_text(gpu['total_gb'])} GB and the model needs about "
                        f"{gb_text(need.gpu_gb)} GB: it fits.")
    return "cpu", (f"This GPU ({gpu['name']}) has {gb_text(gpu['total_gb'])} GB and the model needs about "
                   f"{gb_text(need.gpu_gb)} GB: use a remote server, or {cpu}.")


def weights_state(model: str, to: Path | None) -> dict:
    """Where the weights are (or would go), whether they are there, and the free disk space there."""
    from .hub_download import free_bytes

    if not is_hub_id(model):
        folder = Path(model).expanduser()
        return {"destination": str(folder), "present": (folder / "config.json").is_file(),
                "free_disk_gb": round(free_bytes(folder) / GB, 1)}
    from huggingface_hub import constants, snapshot_download

    present = False
    if to is None:
        try:
            snapshot_download(model, local_files_only=True)
            present = True
        except Exception:  # not in the cache (or incomplete)
            pass
    destination = to if to is not None else Path(constants.HF_HUB_CACHE)
    if to is not None:
        present = (to / "config.json").is_file() and any(to.glob("*.safetensors"))
    return {"destination": str(destination), "present": present, "free_disk_gb": round(free_bytes(destination) / GB, 1)}


def preflight(model: str, to: Path | None) -> dict:
    need = RELEASED_NEED if is_hub_id(model) else need_of_checkpoint(Path(model).expanduser())
    gpu, ram_gb, system = cuda_gpu(), total_ram_gb(), platform.system()
    device, sentence = advice(need, gpu, ram_gb, system)
    weights = weights_state(model, to)
    return {"event": "check", "model": model, "need": need.as_dict(),
            "machine": {"system": system, "gpu": gpu, "ram_gb": round(ram_gb, 1) if ram_gb else None},
            "weights": weights, "device": device,
            "fits": {"gpu": None if gpu is None else gpu["total_gb"] >= need.gpu_gb,
                     "cpu": None if ram_gb is None else ram_gb >= need.cpu_ram_gb,
                     "disk": weights["present"] or weights["free_disk_gb"] >= need.disk_gb},
            "advice": sentence}
