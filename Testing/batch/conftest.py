"""Fixtures of the batch tests: an input folder built from the real chest CT and one local reference run
shared by the local and the Ray tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from batch_helpers import batch_args, file_states, run_batch


@pytest.fixture(scope="session")
def batch_inputs(session_dir: Path, chest_ct_path: Path) -> Path:
    """Two good copies of the chest CT under other names (NRRD and NIfTI), a nested sub/chest.nrrd with the
    same file name as a top-level one, a truncated .nii.gz, a 2D NIfTI, a text file named .nrrd, a .txt."""
    import SimpleITK as sitk

    folder = session_dir / "batch-inputs"
    if folder.exists():
        return folder
    (folder / "sub").mkdir(parents=True)
    shutil.copyfile(chest_ct_path, folder / "chest.nrrd")
    shutil.copyfile(chest_ct_path, folder / "sub" / "chest.nrrd")
    image = sitk.ReadImage(str(chest_ct_path))
    sitk.WriteImage(image, str(folder / "chest_copy.nii.gz"), useCompression=True)
    sitk.WriteImage(image[:, :, 17], str(folder / "flat2d.nii.gz"))
    whole = (folder / "chest_copy.nii.gz").read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(whole[: len(whole) // 3])  # an interrupted copy
    (folder / "notes.nrrd").write_text("not an image, whatever the name says\n")
    (folder / "readme.txt").write_text("not a volume: ignored\n")
    return folder


@pytest.fixture(scope="session")
def local_reference(batch_inputs: Path, tiny_checkpoint: Path, session_dir: Path):
    """One local-engine run over the input folder (with the input checksums before it), shared by the tests."""
    before = file_states(batch_inputs)
    out = session_dir / "batch-local-reference"
    run = run_batch(*batch_args(batch_inputs, out, tiny_checkpoint))
    return out, run, before
