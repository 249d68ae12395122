"""Inputs ITK reads without complaint but wrongly are refused by `segment` and `cases add`
(issue 12, data loss 4): a truncated NIfTI, a DICOM series with a missing slice, NaN/inf voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_ct, tree_snapshot

from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.cli import main as cli
from LymphNodeDGSTLib.errors import UserInputError

SHAPE = (10, 40, 40)


def ct_and_label() -> tuple[sitk.Image, sitk.Image]:
    ct = make_ct(shape_zyx=SHAPE, seed=3)
    array = np.zeros(SHAPE, np.uint8)
    array[3:6, 10:16, 10:16] = 1
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(ct)
    return ct, label


def truncated(ct: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(ct, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def dicom_series(ct: sitk.Image, folder: Path, skip: int | None = None) -> Path:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(ct.GetDepth()):
        if k == skip:
            continue
        piece = ct[:, :, k]
        piece.SetMetaData("0020|0032", "\\".join(map(str, ct.TransformIndexToPhysicalPoint((0, 0, k)))))
        piece.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        piece.SetMetaData("0020|0013", str(k))
        piece.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.7")
        piece.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)
    return folder


def with_value(ct: sitk.Image, value: float, path: Path) -> Path:
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[4, 20, 20:23] = value
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(path))
    return path


# name -> (make the CT file from (ct, folder), words the message holds)
CORRUPT = {
    "truncated .nii.gz": (lambda ct, d: truncated(ct, d / "ct.nii.gz"), "is truncated"),
    "truncated .nii": (lambda ct, d: truncated(ct, d / "ct.nii"), "is truncated"),
    "DICOM series missing a slice": (lambda ct, d: dicom_series(sitk.Cast(ct, sitk.sitkInt16),
                                                                d / "dicom", skip=5),
                                     "a slice is missing"),
    "NaN voxels": (lambda ct, d: with_value(ct, np.nan, d / "ct.nrrd"), "3 NaN voxel(s)"),
    "infinite voxels": (lambda ct, d: with_value(ct, np.inf, d / "ct.mha"), "3 infinite voxel(s)"),
    # issue 26, item 6: ITK's NIfTI reader returns these as 0, so only the stored bytes tell
    "NaN voxels in .nii.gz": (lambda ct, d: with_value(ct, np.nan, d / "ct.nii.gz"), "stores 3 NaN voxel(s)"),
    "infinite voxels in .nii": (lambda ct, d: with_value(ct, -np.inf, d / "ct.nii"), "stores 3 infinite voxel(s)"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_cases_add_refuses_a_corrupt_ct(tmp_path, capsys, case):
    """Catches each check removed from read_image: ITK reads all of these without an error
    (zeros for the missing bytes, a wrong spacing across the gap, NaN/inf passed on), and the
    case library then stored them as training cases silently."""
    make, message = CORRUPT[case]
    ct, label = ct_and_label()
    source = make(ct, tmp_path)
    label_path = tmp_path / "label.nrrd"
    sitk.WriteImage(label, str(label_path))
    home = tmp_path / "home"
    before = tree_snapshot(home)
    status = cli.main(["--home", str(home), "cases", "add", str(source), str(label_path)])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert tree_snapshot(home) == before and CaseLibrary(home / "cases").list() == []


@pytest.mark.parametrize("case", ["truncated .nii.gz", "DICOM series missing a slice", "NaN voxels",
                                  "NaN voxels in .nii.gz"])
def test_segment_refuses_a_corrupt_ct_before_any_work(installed_home, tmp_path, monkeypatch, capsys, case):
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter

    def never(*args, **kwargs):
        raise AssertionError("segmented a corrupt CT")

    monkeypatch.setattr(Segmenter, "segment", never)
    make, message = CORRUPT[case]
    source = make(ct_and_label()[0], tmp_path)
    output = tmp_path / "label.nii.gz"
    status = cli.main(["--home", str(installed_home), "segment", str(source), str(output)])
    err = capsys.readouterr().err
    assert status == 2 and message in err, err
    assert not output.exists()


def test_complete_inputs_still_read(tmp_path):
    """The checks do not refuse good files: full NIfTI (both), a complete DICOM series."""
    ct, label = ct_and_label()
    library = CaseLibrary(tmp_path / "cases")
    sitk.WriteImage(ct, str(tmp_path / "ct.nii"))
    sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
    assert library.add(tmp_path / "ct.nii", tmp_path / "label.nii.gz").id == "case-0001"
    folder = dicom_series(sitk.Cast(make_ct(shape_zyx=SHAPE, seed=4), sitk.sitkInt16), tmp_path / "dicom")
    assert library.add(folder, label).id == "case-0002"


def test_in_memory_image_with_nan_is_refused(tmp_path):
    """The Slicer module passes images, not files: the same check applies."""
    ct, label = ct_and_label()
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    array[0, 0, 0] = np.nan
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    with pytest.raises(UserInputError, match="1 NaN voxel"):
        CaseLibrary(tmp_path / "cases").add(image, label)
