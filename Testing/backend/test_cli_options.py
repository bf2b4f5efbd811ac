"""Every option of the command line is validated when it is parsed: a bad value is a usage error (exit 2) that
names the option, before anything is read or loaded."""
from __future__ import annotations

import pytest

from citrusv_backend.cli import main

pytestmark = pytest.mark.unit

BAD = [
    ("segment", "--window", "nan,nan"), ("segment", "--window", "inf,1"), ("segment", "--window", "40,0"),
    ("segment", "--window", "40,-5"), ("segment", "--window", "wide"), ("segment", "--max-pixels", "0"),
    ("segment", "--max-pixels", "100"), ("segment", "--max-new-tokens", "0"), ("segment", "--batch-size", "0"),
    ("segment", "--max-voxels", "0"), ("segment", "--slice-range", "5:2"), ("segment", "--slice-range", "-1:4"),
    ("infer", "--max-pixels", "0"), ("infer", "--min-pixels", "-5"), ("infer", "--max-new-tokens", "-1"),
    ("serve", "--port", "70000"), ("serve", "--max-upload-mb", "0"), ("serve", "--volume-budget-mb", "-1"),
    ("serve", "--volume-ttl", "nan"), ("serve", "--request-timeout", "0"), ("serve", "--read-timeout", "inf"),
    ("serve", "--max-connections", "0"), ("serve", "--header-timeout", "-1"), ("serve", "--max-voxels", "0"),
    ("serve", "--result-ttl", "0"), ("serve", "--max-new-tokens", "0"), ("batch", "--workers", "-1"),
    ("batch", "--ray-cpus-per-actor", "0"), ("batch", "--ray-actors", "0"), ("batch", "--max-pixels", "0"),
    ("bench", "--repeats", "0"),
]


def _argv(command: str, option: str, value: str, volume: str, out: str, model: str) -> list[str]:
    fast = ["--model", model, "--device", "cpu"]
    if command == "segment":
        args = ["segment", volume, "--prompt", "segment the left lung", "--out", out, "--mode", "per-slice",
                "--slice-range", "15:16", *fast]
    elif command == "infer":
        args = ["infer", "--image", volume, "--prompt", "What is this?", "--out", f"{out}/x", "--max-new-tokens", "1",
                *fast]
    elif command == "serve":
        args = ["serve", *fast]
    elif command == "batch":
        args = ["batch", volume, "--out", out, "--prompt", "x", *fast]
    else:
        args = ["dev", "bench", *fast]
    return args + [f"{option}={value}"]


@pytest.mark.parametrize("command, option, value", BAD, ids=[f"{c} {o}={v}" for c, o, v in BAD])
def test_a_bad_option_value_is_a_usage_error(command, option, value, chest_ct_path, tmp_path, capsys, tiny_checkpoint):
    argv = _argv(command, option, value, str(chest_ct_path if command != "batch" else chest_ct_path.parent),
                 str(tmp_path / "out"), str(tiny_checkpoint))
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    error = capsys.readouterr().err
    assert stopped.value.code == 2, error
    assert f"argument {option}" in error, error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
