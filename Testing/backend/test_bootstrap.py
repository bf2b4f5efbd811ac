"""bootstrap.py's first-use choices (standard library only, run with the user's Python): the torch build per
platform with CITRUSV_TORCH_CUDA_BUILDS read on Linux too, the fall-back across CUDA builds when one has no wheel,
pip's failures named (a missing wheel, a certificate, no network) from the real pip's own output, and the CA bundle
that makes pip trust an organisation's proxy."""
from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

from local_hub import LocalHub, make_certificate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bootstrap():
    spec = importlib.util.spec_from_file_location("citrusv_bootstrap_first_use", REPO / "CitrusVBackend" / "bootstrap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_linux_reads_the_cuda_builds_variable(bootstrap):
    pypi = bootstrap.torch_choice("Linux", (12, 4), "2.13.0", environ={})
    assert (pypi.requirement, pypi.extra_index) == ("torch==2.13.0", None)
    named = bootstrap.torch_choice("Linux", (12, 6), "2.13.0", environ={"CITRUSV_TORCH_CUDA_BUILDS": "cu128,cu126,cu118"})
    assert (named.requirement, named.extra_index) == ("torch==2.13.0+cu126", "https://download.pytorch.org/whl/cu126")
    assert [alternative.requirement for alternative in named.alternatives] == ["torch==2.13.0+cu118"]


@pytest.mark.unit
def test_windows_falls_back_across_the_builds_the_driver_runs(bootstrap):
    choice = bootstrap.torch_choice("Windows", (13, 0), "2.13.0", environ={})
    assert [c.requirement for c in (choice, *choice.alternatives)] == \
        ["torch==2.13.0+cu130", "torch==2.13.0+cu128", "torch==2.13.0+cu126"]


@pytest.mark.unit
@pytest.mark.parametrize("system, words", [("Linux", "distribution's nvidia-driver package"),
                                           ("Windows", "GeForce Experience")])
def test_a_driver_too_old_gets_its_platforms_advice(bootstrap, system, words):
    with pytest.raises(SystemExit) as stop:
        bootstrap.torch_choice(system, (11, 4), "2.13.0", environ={"CITRUSV_TORCH_CUDA_BUILDS": "cu126"})
    assert words in str(stop.value) and "CITRUSV_TORCH_CUDA_BUILDS=cu114" in str(stop.value)


@pytest.mark.unit
def test_a_bad_build_name_is_refused(bootstrap):
    with pytest.raises(SystemExit, match="cuda12 is not a CUDA build tag"):
        bootstrap.torch_choice("Linux", (12, 4), "2.13.0", environ={"CITRUSV_TORCH_CUDA_BUILDS": "cuda12"})


@pytest.mark.unit
def test_a_missing_wheel_tries_the_next_build_and_says_so(bootstrap, monkeypatch, capsys):
    tried = []

    def pip(*args, env=None):
        tried.append(args[0])
        if args[0].endswith("+cu130"):
            raise bootstrap.PipFailed("missing_wheel", 1, "ERROR: No matching distribution found for torch")

    monkeypatch.setattr(bootstrap, "pip", pip)
    installed = bootstrap.install_torch(bootstrap.torch_choice("Windows", (13, 0), "2.13.0", environ={}))
    assert installed.requirement == "torch==2.13.0+cu128" and tried == ["torch==2.13.0+cu130", "torch==2.13.0+cu128"]
    out = capsys.readouterr().out
    assert "torch==2.13.0+cu130 has no wheel for Python" in out and "trying the CUDA build cu128" in out


@pytest.mark.unit
def test_a_certificate_failure_stops_at_once_and_is_named(bootstrap, monkeypatch):
    def pip(*args, env=None):
        raise bootstrap.PipFailed("certificate", 1, "")

    monkeypatch.setattr(bootstrap, "pip", pip)
    with pytest.raises(SystemExit) as stop:
        bootstrap.install_torch(bootstrap.torch_choice("Windows", (13, 0), "2.13.0", environ={}))
    assert "certificate was not trusted" in str(stop.value) and "CITRUSV_CA_BUNDLE" in str(stop.value)
    assert "offline" not in str(stop.value)


@pytest.mark.unit
def test_tls_environment(bootstrap, tmp_path):
    bundle = tmp_path / "org-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    given = bootstrap.tls_environment((23, 0), environ={"CITRUSV_CA_BUNDLE": str(bundle)})
    assert given == {"PIP_CERT": str(bundle), "SSL_CERT_FILE": str(bundle), "REQUESTS_CA_BUNDLE": str(bundle)}
    assert bootstrap.tls_environment((24, 2), environ={}) == {}  # pip's own truststore: the system store
    old = bootstrap.tls_environment((23, 0), environ={})
    assert set(old) <= {"PIP_CERT"} and all(Path(path).is_file() for path in old.values())
    with pytest.raises(SystemExit, match="no such file"):
        bootstrap.tls_environment((24, 2), environ={"CITRUSV_CA_BUNDLE": str(tmp_path / "missing.pem")})


# ---------------------------------------------------------------------------------------------- the real pip

ABSENT = "citrusv-no-such-package==1.0"  # never installed, on no index


@pytest.fixture
def this_pip(bootstrap, monkeypatch):
    """bootstrap's pip() on this test environment's interpreter (which has pip), nothing installed, no pip
    configuration of this machine (its mirrors, wheel folders and constraints)."""
    import os

    for name in [name for name in os.environ if name.startswith("PIP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setattr(bootstrap, "VENV_DIR", Path(sys.prefix))
    monkeypatch.setattr(bootstrap, "venv_python", lambda: Path(sys.executable))
    return bootstrap


def _failure(bootstrap, *args, env=None):
    with pytest.raises(bootstrap.PipFailed) as failed:
        bootstrap.pip("--dry-run", "--no-cache-dir", "--retries", "1", "--timeout", "5", *args,
                      env=bootstrap.child_environment(**(env or {})))
    return failed.value


@pytest.mark.model  # runs pip (a few seconds)
def test_real_pip_failures_are_told_apart(this_pip, tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    missing = _failure(this_pip, "--no-index", "--find-links", str(empty), ABSENT)
    assert missing.kind == "missing_wheel"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    offline = _failure(this_pip, "--index-url", f"http://127.0.0.1:{port}/simple", ABSENT)
    assert offline.kind == "offline", offline.tail[-800:]


@pytest.mark.model
def test_real_pip_trusts_an_organisation_ca_bundle(this_pip, tmp_path, monkeypatch):
    certificate = make_certificate(tmp_path)
    if certificate is None:
        pytest.skip("openssl cannot make a certificate here")
    index = tmp_path / "empty-repo"
    index.mkdir()
    (index / "config.json").write_text("{}")
    hub = LocalHub.from_folder("someone/index", index).start(certificate)  # any HTTPS server: pip gets 404s
    try:
        untrusted = _failure(this_pip, "--index-url", f"{hub.url}/simple", ABSENT,
                             env={"SSL_CERT_FILE": "", "PIP_CERT": ""})
        assert untrusted.kind == "certificate", untrusted.tail[-800:]
        monkeypatch.setattr(this_pip, "_TLS", this_pip.tls_environment((26, 0), {"CITRUSV_CA_BUNDLE": str(certificate[0])}))
        trusted = _failure(this_pip, "--index-url", f"{hub.url}/simple", ABSENT)
        assert trusted.kind == "missing_wheel", trusted.tail[-800:]  # it reached the index: nothing there
    finally:
        hub.stop()
