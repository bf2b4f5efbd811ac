"""What a child process of the module starts with: Slicer's launcher environment removed, options per platform.

Slicer starts its Python through a launcher (`PythonSlicer`, CTK's AppLauncher) that adds to the environment:
PYTHONHOME, PYTHONPATH (Slicer's lib dirs, qt-scripted-modules, bin/Python, its site-packages), PYTHONNOUSERSITE,
PIP_REQUIRE_VIRTUALENV=0, SSL_CERT_FILE=<Slicer>/share/Slicer-X.Y/Slicer.crt, QT_PLUGIN_PATH, SLICER_HOME,
ITK_AUTOLOAD_PATH, LibraryPaths and the library path (LD_LIBRARY_PATH / DYLD_LIBRARY_PATH / PATH on Windows)
(Slicer's CMake/SlicerBlockCTKAppLauncherSettings.cmake and SuperBuild/python_configure_python_launcher.cmake,
v5.8.1 and v5.10.0). Inherited by the backend's own Python, these make it import Slicer's numpy and torch.

Children that run the backend environment's Python get `startup_environment()` (Slicer's own
`slicer.util.startupEnvironment()` inside Slicer, else a cleaned copy of this process's environment) and are
started isolated (`-I`: no PYTHON* variables, no user site). The one child that runs Slicer's own Python (the HTTP
courier, see transport.py) keeps Slicer's environment, which is what that interpreter needs to start at all.
Standard library only.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Set by Slicer's launcher as key=value (never meaningful to another Python).
LAUNCHER_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
                      "PIP_REQUIRE_VIRTUALENV", "SLICER_HOME", "ITK_AUTOLOAD_PATH", "QTWEBENGINE_DISABLE_SANDBOX",
                      "QT_PLUGIN_PATH", "LibraryPaths", "__PYVENV_LAUNCHER__", "VIRTUAL_ENV")
# Path lists the launcher prepends to: only the entries inside Slicer's tree are removed.
PATH_LIST_VARIABLES = ("PATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FRAMEWORK_PATH")
# Set by the launcher to files inside Slicer's tree: removed only when they point there (a user's own CA bundle stays).
TREE_FILE_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")

# Windows process creation flags (subprocess defines them only on Windows).
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000


def slicer_home(environ=None) -> Path | None:
    """Slicer's install (or build) tree: SLICER_HOME as the launcher sets it, else found from this interpreter."""
    environ = os.environ if environ is None else environ
    if environ.get("SLICER_HOME"):
        return Path(environ["SLICER_HOME"])
    executable = Path(sys.executable)
    # <Slicer>/bin/PythonSlicer or <Slicer>/bin/python-real, the standard library in <Slicer>/lib/Python.
    if executable.stem in ("PythonSlicer", "python-real") and (executable.parent.parent / "lib" / "Python").is_dir():
        return executable.parent.parent
    return None


def inside_slicer_application() -> bool:
    try:
        import slicer
    except ImportError:
        return False
    return getattr(slicer, "app", None) is not None


def clean_environment(environ=None, home: Path | None = None) -> dict:
    """`environ` without what Slicer's launcher put there."""
    environ = dict(os.environ if environ is None else environ)
    home = home or slicer_home(environ)
    for name in LAUNCHER_VARIABLES:
        environ.pop(name, None)
    if home is not None:
        root = _normalised(home)
        for name in TREE_FILE_VARIABLES:
            if name in environ and _inside(environ[name], root):
                del environ[name]
        for name in PATH_LIST_VARIABLES:
            if name in environ:
                kept = [entry for entry in environ[name].split(os.pathsep) if entry and not _inside(entry, root)]
                if kept:
                    environ[name] = os.pathsep.join(kept)
                else:
                    del environ[name]
    return environ


def startup_environment() -> dict:
    """The environment for children that must not see Slicer: as Slicer itself was started, cleaned again."""
    home = slicer_home()
    if inside_slicer_application():
        import slicer.util

        return clean_environment(slicer.util.startupEnvironment(), home)
    return clean_environment(os.environ, home)


def isolated(python: str) -> list[str]:
    """An interpreter of the backend environment started without any PYTHON* variable or user site (-I), with
    unbuffered output (-u: PYTHONUNBUFFERED is ignored under -I) and UTF-8 I/O on every platform."""
    return [str(python), "-I", "-u", "-X", "utf8"]


def platform_name() -> str:
    """os.name, behind a function so that the Windows branches can be tested on any platform."""
    return os.name


def popen_options() -> dict:
    """No console window on Windows (closing it would kill the child), and a process group of its own everywhere, so
    that stopping a child stops everything it started."""
    if platform_name() == "nt":
        return {"creationflags": CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def kill_tree(pid: int) -> None:
    """Kill `pid` and every process it started (it leads its own group / job)."""
    if platform_name() == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True,
                       creationflags=CREATE_NO_WINDOW)
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _normalised(path) -> str:
    return os.path.normcase(os.path.abspath(str(path)))


def _inside(path: str, root: str) -> bool:
    candidate = _normalised(path)
    return candidate == root or candidate.startswith(root.rstrip(os.sep) + os.sep)
