"""Finding and building the `sam2` package's SAM2 model from a hydra config file.

The reference names its SAM2 config by an absolute path of its own machine; only the file name counts.
We look for that name beside `config.json` first, then among the configs shipped inside the `sam2`
package. The config is instantiated with OmegaConf + hydra's `instantiate` directly (no global hydra
state), after pointing any `_target_` of a vendored copy (e.g. `third_parts.sam2.modeling...`) at the
installed `sam2.modeling...` classes, which have the same state-dict layout.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import CheckpointError, DependencyError

SAM2_INSTALL_HINT = ("install it without its torchvision requirement (which would replace torch with a CUDA "
                     "build): SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2==1.1.0 && "
                     "pip install hydra-core iopath tqdm   (python3 CitrusVBackend/bootstrap.py setup does this)")


def sam2_package_dir() -> Path:
    spec = importlib.util.find_spec("sam2")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"The `sam2` package is not installed; {SAM2_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_sam2_config(name: str, checkpoint_dir: Path | None) -> Path:
    """Beside config.json first, then inside the installed sam2 package (configs/sam2, configs/sam2.1, ...)."""
    if checkpoint_dir is not None and (Path(checkpoint_dir) / name).is_file():
        return Path(checkpoint_dir) / name
    package_dir = sam2_package_dir()
    candidates = sorted(package_dir.joinpath("configs").rglob(name)) + [package_dir / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(p.name for p in package_dir.joinpath("configs").rglob("*.yaml"))
    raise CheckpointError(f"SAM2 config {name!r} was found neither beside config.json nor in the sam2 package "
                          f"(known: {', '.join(known)}); put the yaml file next to config.json")


def _retarget(node) -> None:
    """Point vendored `..._target_: something.sam2.modeling.X` at the installed `sam2.modeling.X`."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if isinstance(target, str) and "sam2.modeling." in target and not target.startswith("sam2.modeling."):
            node["_target_"] = "sam2.modeling." + target.split("sam2.modeling.", 1)[1]
        for key in node.keys():
            _retarget(node[key])
    elif isinstance(node, ListConfig):
        for item in node:
            _retarget(item)


def build_sam2_model(config_path: Path):
    """Instantiate SAM2Base (random or empty weights; the caller loads the checkpoint's)."""
    sam2_package_dir()
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.load(config_path)
        model_config = config.model
    except Exception as error:  # omegaconf raises many types for bad yaml
        raise CheckpointError(f"{config_path}: not a SAM2 hydra config with a `model` section ({error})") from None
    _retarget(model_config)
    try:
        model = instantiate(model_config, _recursive_=True)
    except Exception as error:
        raise CheckpointError(f"{config_path}: SAM2 could not be built from it ({error})") from None
    return model.eval()


# The sam2 package's video predictor with switchable object-score suppression (see sam2_video.py).
VIDEO_PREDICTOR_TARGET = "citrusv_backend.model.sam2_video.CitrusVVideoPredictor"


def build_sam2_video_predictor(config_path: Path, sam2_model):
    """SAM2's video predictor over the *same* weights as `sam2_model` (tensors shared, not copied).

    The Citrus checkpoint holds the whole SAM2, memory encoder and memory attention included; the video
    predictor is the sam2 package's own class (subclassed in sam2_video.py), built from the same config and
    given those tensors.
    """
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers.initialization import no_init_weights

    config = OmegaConf.load(config_path)
    _retarget(config.model)
    config.model["_target_"] = VIDEO_PREDICTOR_TARGET
    parameter = next(sam2_model.parameters())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(parameter.dtype)
    try:
        with torch.device(parameter.device), no_init_weights():
            predictor = instantiate(config.model, _recursive_=True)
    finally:
        torch.set_default_dtype(previous)
    predictor.load_state_dict(sam2_model.state_dict(), strict=True, assign=True)
    return predictor.eval()
