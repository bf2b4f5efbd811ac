"""The released model on the Hugging Face hub: its id, the files a checkpoint needs, and what a failure to get
them means for the user (which `reason`, which advice). No torch here: `citrusv download` stays light."""
from __future__ import annotations

import os
import ssl
from pathlib import Path

from ..errors import CitrusVError, HubUnreachableError, ModelMissingError

RELEASED_MODEL_ID = "jdh-algo/Citrus-V-8B-v1.0"
# What a checkpoint folder needs (config, weights, tokenizer, the SAM2 yaml); the hub repo may hold more.
CHECKPOINT_FILE_PATTERNS = ("*.json", "*.safetensors", "*.yaml", "*.jinja", "*.txt", "*.model", "*.tiktoken")


def is_hub_id(text: str) -> bool:
    """`owner/name` that is not a path on this machine."""
    path = Path(text).expanduser()
    return not path.exists() and not text.startswith((".", "/", "~", "\\")) and text.count("/") == 1 \
        and ":" not in text


CA_BUNDLE_ENV = "CITRUSV_CA_BUNDLE"


def use_ca_bundle(environ=os.environ) -> None:
    """An organisation's CA bundle ($CITRUSV_CA_BUNDLE, given for CitrusV: it wins over SSL_CERT_FILE) for the hub's
    TLS: huggingface_hub's client (httpx2) reads SSL_CERT_FILE; without either it uses the system's certificate
    store (truststore on Windows and macOS, OpenSSL's on Linux)."""
    bundle = environ.get(CA_BUNDLE_ENV, "").strip()
    if bundle:
        if not Path(bundle).is_file():
            raise HubUnreachableError(f"${CA_BUNDLE_ENV}={bundle}: no such file (a PEM file of your organisation's "
                                      f"CA certificates)")
        environ["SSL_CERT_FILE"] = bundle


def hub_offline(environ=os.environ) -> bool:
    return environ.get("HF_HUB_OFFLINE", "0").strip() not in ("", "0", "false", "False", "no")


def get_the_weights_advice(model_id: str) -> str:
    """Where a user gets the weights: the Slicer panel first, then the command line."""
    return (f"In the Slicer module press Download (about 17 GB for {RELEASED_MODEL_ID}), or Browse… to a folder that "
            f"holds the weights (e.g. copied from another machine or a USB drive). On the command line: "
            f"`citrusv download {model_id}` (`--to FOLDER` for a folder of your choice), or `--model FOLDER`.")


def no_hub_advice(model_id: str) -> str:
    return (f"Without the hub: download the weights on a machine with internet access (`citrusv download {model_id} "
            f"--to Citrus-V-8B`), copy the folder here and choose it with Browse… in the Slicer module "
            f"(or pass --model FOLDER). Behind a proxy, set HTTPS_PROXY; with an organisation's certificate, "
            f"set CITRUSV_CA_BUNDLE (docs/first-use.md).")


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _kind(error: BaseException, *names: str) -> bool:
    """By class name: huggingface_hub 2.x raises httpx2's exceptions, 1.x httpx's, older ones requests'."""
    return any(cls.__name__ in names for cls in type(error).__mro__)


def hub_failure(model_id: str, error: BaseException) -> CitrusVError:
    """The user's error for an exception raised while asking the hub for `model_id`."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for cause in _causes(error):
        if isinstance(cause, OfflineModeIsEnabled) or (hub_offline() and not isinstance(cause, HfHubHTTPError)):
            return HubUnreachableError(f"HF_HUB_OFFLINE is set, so the hub is not asked for {model_id} (unset it to "
                                       f"download). {no_hub_advice(model_id)}")
        if isinstance(cause, HfHubHTTPError) and getattr(cause.response, "status_code", None) in (401, 403, 404):
            return ModelMissingError(f"Model {model_id} was not found on the hub (or needs a login: `hf auth login`). "
                                     f"Check the name; {get_the_weights_advice(model_id)}")
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
            return HubUnreachableError(f"The hub's certificate was not trusted ({cause}): a proxy that inspects TLS? "
                                       f"Set CITRUSV_CA_BUNDLE to a PEM file with your organisation's CA "
                                       f"certificates. {no_hub_advice(model_id)}")
        if _kind(cause, "ProxyError"):
            return HubUnreachableError(f"The proxy refused the connection to the hub ({cause}); check HTTPS_PROXY. "
                                       f"{no_hub_advice(model_id)}")
        if _kind(cause, "TransportError", "ConnectionError", "TimeoutError", "Timeout"):
            return HubUnreachableError(f"The model hub cannot be reached ({type(cause).__name__}: {cause}). "
                                       f"{no_hub_advice(model_id)}")
        if isinstance(cause, HfHubHTTPError):
            status = getattr(cause.response, "status_code", "?")
            return HubUnreachableError(f"The hub answered HTTP {status} for {model_id}; try again later. "
                                       f"{no_hub_advice(model_id)}")
    return HubUnreachableError(f"Model {model_id} could not be fetched ({type(error).__name__}: {error}). "
                               f"{no_hub_advice(model_id)}")
