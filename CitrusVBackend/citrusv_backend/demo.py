"""The sample volume of the main job (`citrusv demo`, the README's first command)."""
from __future__ import annotations

from pathlib import Path

from .errors import InputError

DEFAULT_DEMO_PROMPT = "segment the left lung"


def sample_ct_path() -> Path:
    """The real chest CT that the slicerio package ships (CTChest4.nrrd: 128x128x34, 3 x 3 x 10 mm)."""
    try:
        import slicerio
    except ImportError:
        raise InputError("the sample CT comes with the slicerio package (pip install slicerio); "
                         "or pass --volume FILE") from None
    return Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
