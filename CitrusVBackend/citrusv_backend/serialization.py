"""JSON for results that hold numpy numbers and arrays or paths (files, manifests, HTTP responses)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def json_default(value):
    """`json.dumps(..., default=json_default)`: numpy scalars and arrays as Python values, paths as text."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
