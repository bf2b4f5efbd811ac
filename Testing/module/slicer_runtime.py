"""A CPython laid out and started as 3D Slicer ships and starts its own, for tests of the module's Slicer side.

What Slicer's source says (github.com/Slicer/Slicer at v5.8.1 and v5.10.0):
  * SuperBuild/External_python.cmake: the interpreter is installed as bin/python-real (the launcher bin/PythonSlicer
    starts it), its standard library in lib/Python/lib/pythonX.Y, libpython in lib/Python/lib; there is no RPATH,
    so python-real starts only with the launcher's PYTHONHOME and library path. Slicer 5.8 ships Python 3.9.10
    (Slicer_REQUIRED_PYTHON_VERSION), 5.10 ships 3.12.10.
  * CMake/SlicerBlockCTKAppLauncherSettings.cmake (SLICER_*_INSTALLED) and the python_*_LAUNCHER_INSTALLED values of
    External_python.cmake: the environment every Slicer process (and every child it starts) has. Reproduced by
    `launcher_environment()` below, entry by entry, in the launcher's order.
  * Base/QTCore/qSlicerCoreApplication.cxx sets `sys.executable` to the PythonSlicer launcher.

The copy here: a pyenv CPython's binary and libpython with their RUNPATH removed (the ELF dynamic entry, as
`patchelf --remove-rpath` does) and the compiled-in build prefix overwritten, so the build tree cannot be found by
accident; the standard library hard-linked (or copied) under lib/Python; pip (as Slicer ships it) and numpy
(installed by the fixture's own pip, as slicer.util.pip_install would) in its site-packages. `bin/PythonSlicer` is a
shell script that sets the launcher environment and runs python-real, which is what CTK's AppLauncher does.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PYENV_ROOT = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv"))
RELEASES = {"5.8.1": (3, 9), "5.10.0": (3, 12)}   # Slicer release -> the Python it ships
SKIP_STDLIB = {"site-packages", "test", "__pycache__", "idlelib", "tkinter", "turtledemo"}
DT_NULL, DT_RPATH, DT_RUNPATH = 0, 15, 29


def pyenv_python(version: tuple[int, int]) -> Path | None:
    """The newest pyenv CPython X.Y.* on this machine (None when there is none)."""
    prefix = f"{version[0]}.{version[1]}."
    found = sorted((p for p in (PYENV_ROOT / "versions").glob(prefix + "*") if p.name[len(prefix):].isdigit()),
                   key=lambda p: int(p.name[len(prefix):]))
    return found[-1] if found else None


@dataclass
class SlicerLayout:
    root: Path
    version: str                  # Slicer release
    python_version: tuple[int, int]
    python_real: Path
    python_slicer: Path           # the launcher script (Slicer's sys.executable)
    modules_dir: Path             # where an installed extension's scripted modules are

    @property
    def site_packages(self) -> Path:
        return self.root / "lib" / "Python" / "lib" / f"python{self.python_version[0]}.{self.python_version[1]}" / \
            "site-packages"

    def environment(self, base: dict | None = None) -> dict:
        return launcher_environment(self.root, self.version, self.python_version, base)

    def run(self, arguments: list[str], base_env: dict | None = None, **options) -> subprocess.CompletedProcess:
        """python-real in the launcher's environment (as PythonSlicer would start it)."""
        return subprocess.run([str(self.python_real), *arguments], env=self.environment(base_env), **options)


def slicer_dirs(version: str) -> dict:
    major_minor = ".".join(version.split(".")[:2])
    lib = f"lib/Slicer-{major_minor}"                      # Slicer_LIB_DIR (CMake/SlicerDirectories.cmake)
    return {"bin": "bin", "lib": lib, "share": f"share/Slicer-{major_minor}", "cli": f"{lib}/cli-modules",
            "loadable": f"{lib}/qt-loadable-modules", "loadable_python": f"{lib}/qt-loadable-modules/Python",
            "scripted": f"{lib}/qt-scripted-modules", "itk_factories": f"{lib}/ITKFactories", "qt_plugins": "lib/QtPlugins"}


def launcher_environment(root: Path, version: str, python_version: tuple[int, int], base: dict | None = None) -> dict:
    """The environment Slicer's launcher gives Slicer (and so every child process of it), install tree, Linux."""
    env = dict(os.environ if base is None else base)
    d = slicer_dirs(version)
    r = str(root)
    stdlib = f"{r}/lib/Python/lib/python{python_version[0]}.{python_version[1]}"
    # SLICER_LIBRARY_PATHS_INSTALLED, then the python project's LIBRARY_PATHS_LAUNCHER_INSTALLED.
    library_paths = [f"{r}/{d['bin']}", f"{r}/{d['lib']}", f"{r}/{d['cli']}", f"{r}/{d['loadable']}",
                     f"../{d['loadable']}", f"{r}/lib/Python/lib"]
    # SLICER_PATHS_INSTALLED, then python's PATHS_LAUNCHER_INSTALLED (lib/Python/bin: the scripts directory).
    paths = [f"{r}/{d['bin']}", f"{r}/{d['cli']}", f"{r}/{d['loadable']}", f"{r}/lib/Python/bin"]
    # SLICER_PYTHONPATH_INSTALLED, then python's PYTHONPATH_LAUNCHER_INSTALLED.
    python_path = [f"{r}/{d['lib']}", f"{r}/{d['scripted']}", f"{r}/{d['loadable']}", f"{r}/lib/vtkTeem",
                   f"{r}/bin/Python", f"{r}/{d['loadable_python']}", stdlib, f"{stdlib}/lib-dynload",
                   f"{stdlib}/site-packages"]

    def prepend(name: str, entries: list[str]) -> None:
        env[name] = os.pathsep.join(entries + ([env[name]] if env.get(name) else []))

    prepend("LD_LIBRARY_PATH", library_paths)
    prepend("LibraryPaths", library_paths)
    prepend("PATH", paths)
    prepend("PYTHONPATH", python_path)
    prepend("QT_PLUGIN_PATH", [f"{r}/{d['qt_plugins']}"])
    env.update({
        # SLICER_ENVVARS_INSTALLED
        "SLICER_HOME": r, "ITK_AUTOLOAD_PATH": f"{r}/{d['itk_factories']}", "PIP_REQUIRE_VIRTUALENV": "0",
        "SSL_CERT_FILE": f"{r}/{d['share']}/Slicer.crt", "QTWEBENGINE_DISABLE_SANDBOX": "1",
        # python_ENVVARS_LAUNCHER_INSTALLED
        "PYTHONHOME": f"{r}/lib/Python", "PYTHONNOUSERSITE": "1",
    })
    return env


def remove_runpath(path: Path) -> None:
    """Drop DT_RPATH / DT_RUNPATH from an ELF64 little-endian file's dynamic section (like patchelf --remove-rpath)."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit little-endian ELF file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + index * phentsize)
        if p_type != 2:  # PT_DYNAMIC
            continue
        entries = [struct.unpack_from("<qQ", data, p_offset + n * 16) for n in range(p_filesz // 16)]
        kept = [e for e in entries if e[0] not in (DT_RPATH, DT_RUNPATH)]
        kept += [(DT_NULL, 0)] * (len(entries) - len(kept))
        for n, (tag, value) in enumerate(kept):
            struct.pack_into("<qQ", data, p_offset + n * 16, tag, value)
    path.write_bytes(bytes(data))


def hide_prefix(path: Path, prefix: Path) -> None:
    """Overwrite the compiled-in build prefix with a folder that does not exist (same length). Only the folder above
    the prefix's last part is replaced: the linker merges string tails, so the "3.12.1" ending the prefix is also
    the interpreter's version string."""
    parent = str(prefix.parent)
    hidden = ("/nonexistent-build-prefix" + "x" * len(parent))[:len(parent)]
    path.write_bytes(path.read_bytes().replace(parent.encode(), hidden.encode()))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_layout(destination: Path, version: str, pip_cache: Path | None = None) -> SlicerLayout:
    """Lay out the CPython that Slicer `version` ships (from pyenv) under `destination`."""
    python_version = RELEASES[version]
    source = pyenv_python(python_version)
    if source is None:
        raise FileNotFoundError(f"no pyenv CPython {python_version[0]}.{python_version[1]} in {PYENV_ROOT}/versions")
    xy = f"{python_version[0]}.{python_version[1]}"
    root = destination
    python_home = root / "lib" / "Python"
    (root / "bin" / "Python").mkdir(parents=True, exist_ok=True)
    d = slicer_dirs(version)
    for folder in (d["scripted"], d["loadable_python"], d["cli"], d["itk_factories"], d["qt_plugins"], d["share"],
                   "lib/Python/bin"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt" if Path("/etc/ssl/certs/ca-certificates.crt").is_file()
                 else __import__("certifi").where(), root / d["share"] / "Slicer.crt")
    shutil.copytree(source / "lib" / f"python{xy}", python_home / "lib" / f"python{xy}", copy_function=_link_or_copy,
                    ignore=lambda folder, names: [n for n in names if n in SKIP_STDLIB and
                                                  Path(folder) == source / "lib" / f"python{xy}"])
    site = python_home / "lib" / f"python{xy}" / "site-packages"
    site.mkdir()
    for package in (source / "lib" / f"python{xy}" / "site-packages").glob("pip*"):
        (shutil.copytree(package, site / package.name, copy_function=_link_or_copy) if package.is_dir()
         else shutil.copy2(package, site / package.name))
    library = f"libpython{xy}.so.1.0"
    shutil.copy2(source / "lib" / library, python_home / "lib" / library)
    python_real = root / "bin" / "python-real"
    shutil.copy2(source / "bin" / f"python{xy}", python_real)
    for binary in (python_real, python_home / "lib" / library):
        remove_runpath(binary)
        hide_prefix(binary, source)
    layout = SlicerLayout(root, version, python_version, python_real, root / "bin" / "PythonSlicer",
                          root / "Extensions" / "CitrusVSlicer" / d["scripted"])
    _write_launcher(layout)
    # What Slicer ships in its site-packages and the module needs: numpy (pip-installed like slicer.util.pip_install).
    pip_env = {"PIP_CACHE_DIR": str(pip_cache)} if pip_cache else {}
    result = layout.run(["-m", "pip", "install", "--disable-pip-version-check", "--no-warn-script-location",
                         "--progress-bar", "off", "numpy"], dict(os.environ, **pip_env), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pip install numpy into the Slicer layout failed:\n{result.stdout}\n{result.stderr}")
    return layout


def _write_launcher(layout: SlicerLayout) -> None:
    env = launcher_environment(layout.root, layout.version, layout.python_version, base={})
    exports = "".join(f'export {name}="{value}${{{name}:+:${name}}}"\n' if name in
                      ("PATH", "LD_LIBRARY_PATH", "LibraryPaths", "PYTHONPATH", "QT_PLUGIN_PATH")
                      else f'export {name}="{value}"\n' for name, value in env.items())
    layout.python_slicer.write_text("#!/bin/sh\n# Slicer's PythonSlicer (CTK AppLauncher): its settings, then python-real\n"
                                    + exports + f'exec "{layout.python_real}" "$@"\n')
    layout.python_slicer.chmod(0o755)


def install_module(layout: SlicerLayout, repo: Path) -> Path:
    """The CitrusVSlicer module as an installed extension has it: the module files with CitrusVBackend beside them."""
    target = layout.modules_dir
    target.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for item in (repo / "CitrusVSlicer").iterdir():
        if item.name in ("CMakeLists.txt", "Testing"):
            continue
        (shutil.copytree(item, target / item.name, ignore=ignore) if item.is_dir() else shutil.copy2(item, target))
    shutil.copytree(repo / "CitrusVBackend", target / "CitrusVBackend", ignore=ignore)
    return target


if __name__ == "__main__":  # build one by hand: python slicer_runtime.py DEST 5.10.0
    print(build_layout(Path(sys.argv[1]), sys.argv[2]))
