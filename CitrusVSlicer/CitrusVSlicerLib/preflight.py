"""Before anything is installed or downloaded: does it fit this machine? In numbers, with what to do instead.

Compares the GPU's memory with the model's need, the free disk at the environment's and the weights' destinations
with what goes there, and the RAM with what the CPU needs; then says which ways fit: the GPU here, the CPU here
(slow), or a remote server. The GPU facts come from a finished GpuProbe (nvidia-smi as a child process); RAM and
disk are read directly (cheap). macOS runs the model on the CPU (no MPS: docs/first-use-slicer.md).
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .requirements import CPU_ENV_GB, GPU_ENV_GB, ModelNeed, gb


def total_ram_gb() -> float | None:
    try:
        if os.name == "nt":
            class MemoryStatus(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                            ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                            ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                            ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                            ("sullAvailExtendedVirtual", ctypes.c_ulonglong)]
            status = MemoryStatus()
            status.dwLength = ctypes.sizeof(MemoryStatus)
            ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
            return status.ullTotalPhys / 1e9
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (OSError, ValueError, AttributeError):
        return None


def free_disk_gb(path: Path) -> float:
    """Free space on the drive that holds `path` (its nearest existing folder)."""
    probe = Path(path).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free / 1e9


def apple_silicon() -> bool:
    """An Apple silicon Mac, even when this process runs under Rosetta (Slicer for macOS is an x86_64 build):
    the kernel says hw.optional.arm64 = 1 to translated processes too, while platform.machine() says x86_64."""
    if platform.system() != "Darwin":
        return False
    if platform.machine() == "arm64":
        return True
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm64"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "1"


@dataclass
class MachineFacts:
    gpu_name: str | None
    gpu_memory_gb: float | None
    ram_gb: float | None
    system: str = field(default_factory=platform.system)


@dataclass
class Preflight:
    """What the plan dialog says and which device it offers."""

    facts: MachineFacts
    need: ModelNeed
    env_dir: Path | None          # None: the environment exists already
    env_free_gb: float
    weights_dir: Path | None      # None: the weights are here already
    weights_free_gb: float

    @property
    def env_needed_gb(self) -> float:
        return GPU_ENV_GB if self.facts.gpu_name else CPU_ENV_GB

    @property
    def gpu_fits(self) -> bool:
        return bool(self.facts.gpu_name) and (self.facts.gpu_memory_gb or 0) >= self.need.gpu_gb

    @property
    def cpu_fits(self) -> bool:
        return self.facts.ram_gb is None or self.facts.ram_gb >= self.need.cpu_ram_gb

    @property
    def disk_problems(self) -> list[str]:
        problems = []
        same_drive = self.env_dir is not None and self.weights_dir is not None and \
            _drive(self.env_dir) == _drive(self.weights_dir)
        if same_drive and self.env_needed_gb + self.need.weights_gb > self.env_free_gb:
            return [f"the environment and the weights need about {gb(self.env_needed_gb + self.need.weights_gb)} "
                    f"on the drive of {self.env_dir}, {gb(self.env_free_gb)} are free"]
        if self.env_dir is not None and self.env_needed_gb > self.env_free_gb:
            problems.append(f"the environment needs about {gb(self.env_needed_gb)} in {self.env_dir}, "
                            f"{gb(self.env_free_gb)} are free")
        if self.weights_dir is not None and self.need.weights_gb > self.weights_free_gb:
            problems.append(f"the weights need about {gb(self.need.weights_gb)} in {self.weights_dir}, "
                            f"{gb(self.weights_free_gb)} are free")
        return problems

    @property
    def suggested_device(self) -> str:
        """"cuda" when the GPU fits, "cpu" when only the CPU does, "remote" when neither."""
        if self.gpu_fits:
            return "cuda"
        return "cpu" if self.cpu_fits else "remote"

    def _ram(self) -> str:
        return f", this machine has {gb(self.facts.ram_gb)}" if self.facts.ram_gb else ""

    def device_summary(self) -> str:
        """Which device the model will use, and why, in one or two sentences."""
        facts, need = self.facts, self.need
        cpu = f"the CPU (needs about {gb(need.cpu_ram_gb)} of RAM{self._ram()}; minutes per volume)"
        if facts.system == "Darwin":
            fits = "" if self.cpu_fits else " — not enough: use a remote server"
            return (f"On macOS the model runs on the CPU (needs about {gb(need.cpu_ram_gb)} of RAM, this Mac has "
                    f"{gb(facts.ram_gb or 0)}{fits}); Apple's GPU (MPS) is not used.")
        if self.gpu_fits:
            return f"The model will run on the GPU ({facts.gpu_name}, {gb(facts.gpu_memory_gb)}; it needs about " \
                   f"{gb(need.gpu_gb)})."
        if facts.gpu_name:
            memory = gb(facts.gpu_memory_gb) if facts.gpu_memory_gb else "too little memory"
            head = f"This GPU ({facts.gpu_name}) has {memory} and the model needs about {gb(need.gpu_gb)}: "
            if self.cpu_fits:
                return head + f"use a remote server, or {cpu}."
            return head + f"use a remote server (the CPU would need about {gb(need.cpu_ram_gb)} of RAM{self._ram()})."
        if self.cpu_fits:
            return (f"No NVIDIA GPU was found: the model will run on {cpu}. A remote server with a GPU of about "
                    f"{gb(need.gpu_gb)} is much faster.")
        return (f"No NVIDIA GPU was found and the CPU would need about {gb(need.cpu_ram_gb)} of RAM{self._ram()}: "
                f"use a remote server with a GPU of about {gb(need.gpu_gb)}.")

    def describe(self) -> str:
        lines = [self.device_summary()]
        if self.weights_dir is not None:
            lines.append(f"Weights: about {gb(self.need.weights_gb)} into {self.weights_dir} "
                         f"({gb(self.weights_free_gb)} free).")
        if self.env_dir is not None:
            lines.append(f"Environment: about {gb(self.env_needed_gb)} in {self.env_dir} "
                         f"({gb(self.env_free_gb)} free).")
        for problem in self.disk_problems:
            lines.append(f"Not enough disk space: {problem}. Free space or choose another folder.")
        return "\n".join(lines)


def _drive(path: Path) -> int | str:
    probe = Path(path).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.stat(probe).st_dev
    except OSError:
        return str(probe.anchor)


def preflight(facts: MachineFacts, need: ModelNeed, env_dir: Path | None, weights_dir: Path | None,
              free_disk=free_disk_gb) -> Preflight:
    """`env_dir` / `weights_dir`: None when that part is already in place. `free_disk(path)` in GB (tests replace
    it to simulate a full disk)."""
    return Preflight(facts, need, env_dir, free_disk(env_dir) if env_dir is not None else 0.0,
                     weights_dir, free_disk(weights_dir) if weights_dir is not None else 0.0)
