"""Run inside Slicer by .github/workflows/slicer.yml: the CitrusVSlicer self-test, then exit with its result.

    xvfb-run Slicer --testing --no-splash --additional-module-paths CitrusVSlicer --python-script run_selftest.py
"""
import sys
import traceback

import slicer

status = 1
try:
    print(f"Slicer {slicer.app.applicationVersion}, Python {sys.version.split()[0]} ({sys.executable})", flush=True)
    test = getattr(slicer, "selfTests", {}).get("CitrusVSlicer")
    if test is None:
        raise RuntimeError("the CitrusVSlicer module was not loaded; loaded modules with a self-test: "
                           + ", ".join(sorted(getattr(slicer, "selfTests", {}))))
    test(msec=10)
    status = 0
    print("CitrusVSlicer self-test passed", flush=True)
except Exception:
    traceback.print_exc()
    print("CitrusVSlicer self-test FAILED", flush=True)
finally:
    sys.stdout.flush()
    slicer.util.exit(status)
