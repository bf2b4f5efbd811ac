"""Batch pieces without a model: case discovery and ids, prompts files, the manifest, folder safety, usage errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from citrusv_backend.batch.discovery import assign_case_ids, base_case_id, case_folder, discover_cases
from citrusv_backend.batch.manifest import Manifest, sha256_of_input
from citrusv_backend.batch.prompts import combine_prompts, load_prompts_file, prompts_for, unused_keys
from citrusv_backend.cli import main
from citrusv_backend.errors import InputError
from citrusv_backend.volume.tasks.targets import parse_targets

pytestmark = pytest.mark.unit


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def fake_dicom(path: Path) -> Path:
    return touch(path, b"\0" * 128 + b"DICM" + b"\0" * 16)


def test_case_ids_are_safe_and_unique():
    ids = assign_case_ids(["scan.nii.gz", "a/scan.nii.gz", "b/scan.nii.gz", "a__scan.nrrd", "Scan.nii",
                           "weird name (1).nii.gz", "../evil.nii", "manifest.jsonl.nii", ".hidden.nrrd"])
    assert ids["a/scan.nii.gz"] == "a__scan" and ids["b/scan.nii.gz"] == "b__scan"
    assert ids["a__scan.nrrd"].startswith("a__scan-")  # clashes with a/scan: a short hash of its path
    assert ids["Scan.nii"] == "Scan"                   # sorted first: keeps the plain id
    assert ids["scan.nii.gz"].startswith("scan-")      # clashes case-insensitively
    assert ids["weird name (1).nii.gz"] == "weird_name_1"
    assert ids["manifest.jsonl.nii"].startswith("manifest.jsonl-")  # a name the batch writes itself
    assert len(set(i.lower() for i in ids.values())) == len(ids)
    for case in ids.values():
        assert "/" not in case and not case.startswith(".") and case not in ("", "..")
    assert len(base_case_id("x" * 400 + ".nii")) <= 120


def test_discovery_finds_volumes_dicom_folders_and_ignores_the_rest(tmp_path: Path):
    touch(tmp_path / "one.nii.gz")
    touch(tmp_path / "two.NRRD")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden.nii")
    touch(tmp_path / "deep" / "er" / "three.mha")
    for n in range(3):
        fake_dicom(tmp_path / "series1" / f"IM{n}")
    flat, ignored = discover_cases(tmp_path)
    assert [(c.case, c.kind) for c in flat] == [("one", "file"), ("series1", "dicom"), ("two", "file")]
    assert ignored == 1
    deep, _ = discover_cases(tmp_path, recursive=True)
    assert {c.relative for c in deep} == {"one.nii.gz", "two.NRRD", "series1", "deep/er/three.mha"}
    assert next(c for c in deep if c.relative == "deep/er/three.mha").case == "deep__er__three"
    only, _ = discover_cases(tmp_path, pattern="*.nii.gz", recursive=True)
    assert [c.relative for c in only] == ["one.nii.gz"]
    with pytest.raises(InputError, match="not a folder"):
        discover_cases(tmp_path / "one.nii.gz")


def test_dicom_folder_checksum_covers_names_and_contents(tmp_path: Path):
    fake_dicom(tmp_path / "s" / "IM0")
    first = sha256_of_input(tmp_path / "s")
    touch(tmp_path / "s" / "IM1", b"more")
    assert sha256_of_input(tmp_path / "s") != first


def test_case_folder_never_leaves_the_output_folder(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    assert case_folder(out, "scan") == out.resolve() / "scan"
    for bad in ("..", ".staging", "a/b", ""):
        with pytest.raises(InputError):
            case_folder(out, bad)
    (out / "linked").symlink_to(tmp_path)
    with pytest.raises(InputError, match="would leave"):
        case_folder(out, "linked")


def test_prompts_file_csv_and_yaml_most_specific_key_wins(tmp_path: Path):
    inputs = tmp_path / "in"
    for relative in ("a.nii.gz", "liver/b.nii.gz", "liver/deep/c.nii.gz", "other/d.nii.gz"):
        touch(inputs / relative)
    cases = {c.relative: c for c in discover_cases(inputs, recursive=True)[0]}
    csv_file = tmp_path / "prompts.csv"
    csv_file.write_text("path,prompt\nliver,segment the liver\nliver/deep/c.nii.gz,segment the tumour\n"
                        "liver/deep/c.nii.gz,segment the spleen\na,segment the kidney\ntypo/x.nii,segment x\n")
    table = load_prompts_file(csv_file)
    assert prompts_for(cases["a.nii.gz"], table, ["fallback"]) == ["segment the kidney"]  # by case id
    assert prompts_for(cases["liver/b.nii.gz"], table, ["fallback"]) == ["segment the liver"]  # by folder
    assert prompts_for(cases["liver/deep/c.nii.gz"], table, []) == ["segment the tumour", "segment the spleen"]
    assert prompts_for(cases["other/d.nii.gz"], table, ["fallback"]) == ["fallback"]
    assert unused_keys(table, list(cases.values())) == ["typo/x.nii"]
    yaml_file = tmp_path / "prompts.yaml"
    yaml_file.write_text("'.': segment the heart\nliver/b.nii.gz: [segment the liver, segment the spleen]\n")
    table = load_prompts_file(yaml_file)
    assert prompts_for(cases["other/d.nii.gz"], table, []) == ["segment the heart"]
    assert prompts_for(cases["liver/b.nii.gz"], table, []) == ["segment the liver", "segment the spleen"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,text\na,b\n")
    with pytest.raises(InputError, match="'prompt' column"):
        load_prompts_file(bad)


def test_several_prompts_are_several_targets():
    assert combine_prompts(["segment the liver"], "segment") == "segment the liver"
    combined = combine_prompts(["segment the liver", "the spleen and the left kidney"], "segment")
    assert [t.name for t in parse_targets(combined)] == ["liver", "spleen", "left kidney"]
    with pytest.raises(InputError, match="one prompt per case"):
        combine_prompts(["a", "b"], "detect")


def test_manifest_keeps_the_last_entry_and_repairs_a_torn_line(tmp_path: Path):
    manifest = Manifest(tmp_path)
    manifest.append({"case": "a", "status": "failed"})
    manifest.append({"case": "a", "status": "done"})
    with open(manifest.path, "a") as handle:
        handle.write('{"case": "b", "sta')  # killed mid-write
    assert {k: v["status"] for k, v in manifest.latest().items()} == {"a": "done"}
    manifest.repair_tail()
    manifest.append({"case": "b", "status": "done"})
    lines = manifest.path.read_text().splitlines()
    assert [json.loads(line)["case"] for line in lines] == ["a", "a", "b"]


def test_usage_errors_exit_2_and_write_nothing_into_the_input(tmp_path: Path, capsys):
    inputs = tmp_path / "in"
    touch(inputs / "a.nii.gz")
    before = sorted(p.as_posix() for p in inputs.rglob("*"))
    assert main(["batch", str(inputs), "--out", str(inputs / "results"), "--prompt", "x"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["batch", str(inputs), "--out", str(inputs), "--prompt", "x"]) == 2
    assert main(["batch", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--prompt", "x"]) == 2
    assert main(["batch", str(inputs), "--out", str(tmp_path / "out")]) == 2
    assert "no prompt for 1 case" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["batch", str(tmp_path / "empty"), "--out", str(tmp_path / "out2"), "--prompt", "x"]) == 2
    assert "no volumes in" in capsys.readouterr().err
    assert main(["batch", str(inputs), "--out", str(tmp_path / "out3"), "--prompt", "x", "--ray-actors", "2"]) == 2
    assert sorted(p.as_posix() for p in inputs.rglob("*")) == before
    with pytest.raises(SystemExit) as usage:
        main(["batch", str(inputs), "--prompt", "x"])  # --out missing: argparse
    assert usage.value.code == 2


def test_image_tags_in_prompt_files_mark_the_image_not_a_target(tmp_path: Path):
    """Prompt files copied from the reference's data carry `<image>\\n`: the targets are the same as without it,
    and a prompt that is asked as it is keeps the tag, so the processor puts the image where it stands."""
    yaml_file = tmp_path / "prompts.yaml"
    yaml_file.write_text("a: [\"<image>\\nPlease help segment the liver in this scan.\", \"<image>\\nsegment the spleen\"]\n"
                         "b: \"<image>\\nWhat is the largest organ here?\"\n")
    table = load_prompts_file(yaml_file)
    combined = combine_prompts(table["a"], "segment")
    assert [t.name for t in parse_targets(combined)] == ["liver", "spleen"]
    question = parse_targets(combine_prompts(table["b"], "segment"))
    assert [t.name for t in question] == ["What is the largest organ here"]
    assert question[0].query == "<image>\nWhat is the largest organ here?"
    with pytest.raises(InputError, match="prompt is empty"):
        parse_targets("<image>\n")
