"""The site case library: add / list / remove, its input checks, atomicity and privacy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_ct, run_cli, shared_file, tree_snapshot

from LymphNodeDGSTLib.cli import main as cli
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary, image_sha256
from LymphNodeDGSTLib.errors import UserInputError, WriteFailed

SHAPE = (10, 40, 40)
ORIGIN = (-30.0, -28.5, 12.0)


def small_ct(seed: int = 0, **geometry) -> sitk.Image:
    return make_ct(shape_zyx=SHAPE, origin=geometry.pop("origin", ORIGIN), seed=seed, **geometry)


def label_on(image: sitk.Image, values=(1,), dtype=np.uint8) -> sitk.Image:
    """A label on `image`'s grid: one box of 4x6x6 = 144 voxels per value, side by side."""
    array = np.zeros(SHAPE, dtype=dtype)
    for k, value in enumerate(values):
        array[2:6, 4 + 10 * k: 10 + 10 * k, 10:16] = value
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(image)
    return label


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


def write_dicom_series(image: sitk.Image, folder: Path) -> Path:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_image.SetMetaData("0020|0032", "\\".join(map(str, position)))
        slice_image.SetMetaData("0020|0013", str(k))
        slice_image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2")
        slice_image.SetMetaData("0008|0060", "CT")
        slice_image.SetMetaData("0010|0010", "DOE^JOHN")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    return folder


def library_entries(home: Path) -> list[str]:
    """Every name directly in the cases folder, hidden ones included."""
    folder = home / "cases"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def in_process_cli(capsys, home: Path, *args: str) -> tuple[int, str, str]:
    status = cli.main(["--home", str(home), "cases", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------- the Python API
def test_add_list_get_remove(tmp_path):
    library = CaseLibrary(tmp_path / "cases")
    assert library.list() == [] and len(library) == 0 and not library.root.exists()
    ct = small_ct()
    label = label_on(ct)
    record = library.add(write(ct, tmp_path / "ct.nii.gz"), write(label, tmp_path / "label.nii.gz"))

    assert record.id == "case-0001" and record.folder == library.root / "case-0001"
    stored_image = sitk.ReadImage(str(record.image_path))
    stored_label = sitk.ReadImage(str(record.label_path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored_image), sitk.GetArrayFromImage(ct))
    assert stored_label.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored_label), sitk.GetArrayFromImage(label))
    for image in (stored_image, stored_label):
        assert image.GetSize() == ct.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-6)

    metadata = json.loads((record.folder / "case.json").read_text())
    assert metadata == record.metadata
    voxels = 4 * 6 * 6
    assert metadata["id"] == "case-0001" and metadata["notes"] == []
    assert metadata["size"] == [40, 40, 10] and metadata["spacing"] == [1.5, 1.5, 3.0]
    assert metadata["label_voxels"] == voxels
    assert metadata["label_volume_mm3"] == pytest.approx(voxels * 1.5 * 1.5 * 3.0)
    assert metadata["image_sha256"] == image_sha256(ct) and len(metadata["image_sha256"]) == 64
    assert metadata["added"].endswith("+00:00")

    second = library.add(small_ct(seed=1), label_on(small_ct(seed=1)), case_id="site_B-7")
    third = library.add(small_ct(seed=2), label_on(small_ct(seed=2)))
    assert [r.id for r in library.list()] == ["case-0001", "case-0002", "site_B-7"]
    assert third.id == "case-0002" and len(library) == 3
    assert library.get("site_B-7") == second

    library.remove("case-0001")
    assert [r.id for r in library.list()] == ["case-0002", "site_B-7"]
    assert library_entries(tmp_path) == ["case-0002", "site_B-7"]  # no trash left behind
    with pytest.raises(UserInputError, match="no case 'case-0001'"):
        library.get("case-0001")
    with pytest.raises(UserInputError, match="no case 'case-0001'"):
        library.remove("case-0001")


def test_nrrd_files_and_in_memory_images(tmp_path):
    library = CaseLibrary(tmp_path / "cases")
    ct = small_ct()
    from_nrrd = library.add(write(ct, tmp_path / "ct.nrrd"), write(label_on(ct), tmp_path / "label.nrrd"))
    other = small_ct(seed=3)
    from_memory = library.add(other, label_on(other, dtype=np.int16))
    for record, source in ((from_nrrd, ct), (from_memory, other)):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(record.image_path))),
                                      sitk.GetArrayFromImage(source))
        assert sitk.ReadImage(str(record.label_path)).GetPixelID() == sitk.sitkUInt8
        assert record.metadata["label_voxels"] == 144


def test_dicom_folder_image_and_no_patient_data_kept(tmp_path):
    ct = small_ct()
    folder = write_dicom_series(sitk.Cast(ct, sitk.sitkInt16), tmp_path / "DOE_JOHN_series")
    library = CaseLibrary(tmp_path / "cases")
    record = library.add(folder, write(label_on(ct), tmp_path / "DOE_JOHN_label.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(record.image_path))),
                                  sitk.GetArrayFromImage(ct))
    for path in record.folder.iterdir():
        data = path.read_bytes() if path.suffix == ".json" else _gunzip(path)
        assert b"DOE" not in data, path
    # The same voxels from a NIfTI file are the same image.
    with pytest.raises(UserInputError, match="already in the library as case 'case-0001'"):
        library.add(write(ct, tmp_path / "again.nii.gz"), label_on(ct))


def _gunzip(path: Path) -> bytes:
    import gzip
    return gzip.decompress(path.read_bytes())


def test_source_names_are_kept_only_on_request(tmp_path):
    ct, other = small_ct(), small_ct(seed=4)
    image_path = write(ct, tmp_path / "SMITH_anna_ct.nrrd")
    label_path = write(label_on(ct), tmp_path / "SMITH_anna_label.nrrd")
    library = CaseLibrary(tmp_path / "cases")
    plain = library.add(image_path, label_path)
    assert "SMITH" not in (plain.folder / "case.json").read_text() and "source" not in plain.metadata
    kept = library.add(write(other, tmp_path / "SMITH_b.nii.gz"), label_on(other), keep_source_name=True)
    assert kept.metadata["source"] == {"image": "SMITH_b.nii.gz"}


def test_header_metadata_is_not_copied(tmp_path):
    # An NRRD field ITK_FileNotes would become the NIfTI `descrip` field if headers were copied.
    ct = small_ct()
    for key in ("ITK_FileNotes", "PatientName"):
        ct.SetMetaData(key, "ROE^RICHARD")
    path = write(ct, tmp_path / "ct.nrrd")
    assert "ROE^RICHARD" in path.read_bytes().decode("latin-1")
    record = CaseLibrary(tmp_path / "cases").add(path, label_on(ct))
    assert b"ROE" not in _gunzip(record.image_path)


@pytest.mark.parametrize("shift", [
    {"origin": (0.1 * 1.5, 0.0, 0.0)},            # 0.1 voxel along x
    {"origin": (0.0, -0.3 * 1.5, 0.2 * 3.0)},     # 0.3 voxel along y, 0.2 along z
    {"spacing": 1.005},                            # 0.5 % larger spacing
])
def test_label_a_fraction_of_a_voxel_off_is_resampled_with_a_note(tmp_path, shift):
    ct = small_ct()
    label = label_on(ct)
    label.SetOrigin(tuple(np.add(ct.GetOrigin(), shift.get("origin", (0, 0, 0)))))
    label.SetSpacing(tuple(np.multiply(ct.GetSpacing(), shift.get("spacing", 1.0))))
    record = CaseLibrary(tmp_path / "cases").add(ct, label)
    assert len(record.metadata["notes"]) == 1 and "resampled" in record.metadata["notes"][0]
    stored = sitk.ReadImage(str(record.label_path))
    np.testing.assert_allclose(stored.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(stored.GetSpacing(), ct.GetSpacing(), atol=1e-6)
    # Less than half a voxel off, nearest neighbour keeps every voxel where it was.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(label))


def test_header_rounding_is_the_same_grid_without_note(tmp_path):
    ct = small_ct()
    label = label_on(ct)
    label.SetOrigin(tuple(np.add(ct.GetOrigin(), (1e-5, -1e-5, 0))))
    label.SetSpacing(tuple(np.multiply(ct.GetSpacing(), 1 + 1e-7)))
    record = CaseLibrary(tmp_path / "cases").add(ct, label)
    assert record.metadata["notes"] == []
    assert sitk.ReadImage(str(record.label_path)).GetOrigin() == pytest.approx(ct.GetOrigin(), abs=1e-6)


def test_label_value_takes_one_value_as_node(tmp_path):
    ct = small_ct()
    label = label_on(ct, values=(3, 7, 1))
    seven = int(np.count_nonzero(sitk.GetArrayViewFromImage(label) == 7))
    record = CaseLibrary(tmp_path / "cases").add(ct, label, label_value=7)
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(record.label_path)))
    assert set(np.unique(stored)) == {0, 1} and record.metadata["label_voxels"] == seven > 0
    np.testing.assert_array_equal(stored, sitk.GetArrayFromImage(label) == 7)


def test_float_label_of_zeros_and_ones_is_accepted(tmp_path):
    ct = small_ct()
    record = CaseLibrary(tmp_path / "cases").add(ct, label_on(ct, dtype=np.float32))
    assert record.metadata["label_voxels"] == 144


def test_leftover_staging_trash_and_incomplete_folders_are_never_listed(tmp_path):
    library = CaseLibrary(tmp_path / "cases")
    ct = small_ct()
    library.add(ct, label_on(ct))
    for name in (".staging-abc123", ".trash-case-0009-ff"):
        (library.root / name).mkdir()
        write(ct, library.root / name / "image.nii.gz")
        (library.root / name / "case.json").write_text(json.dumps({"id": name}))
    (library.root / "case-0005").mkdir()  # a folder without case.json: not a case
    assert [r.id for r in library.list()] == ["case-0001"] and len(library) == 1
    other = small_ct(seed=5)
    assert library.add(other, label_on(other)).id == "case-0006"  # never reuses a folder name


def test_a_failure_while_writing_leaves_no_half_case(tmp_path, monkeypatch):
    import LymphNodeDGSTLib.adaptation.cases.library as cases_module

    library = CaseLibrary(tmp_path / "cases")
    ct = small_ct()

    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(cases_module, "write_json_atomic", crash)
    with pytest.raises(WriteFailed, match="disk full"):
        library.add(ct, label_on(ct))
    assert library.list() == [] and library_entries(tmp_path) == []


# ---------------------------------------------------------------- bad inputs: exit 2, nothing changed
def _other_direction(ct: sitk.Image) -> sitk.Image:
    label = label_on(ct)
    label.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    return label


def _other_size(ct: sitk.Image) -> sitk.Image:
    label = sitk.GetImageFromArray(np.ones((10, 40, 36), np.uint8))
    label.SetOrigin(ct.GetOrigin())
    label.SetSpacing(ct.GetSpacing())
    return label


def _far_off_grid(ct: sitk.Image) -> sitk.Image:
    label = label_on(ct)
    label.SetOrigin(tuple(np.add(ct.GetOrigin(), (2 * 1.5, 0, 0))))
    return label


def _spacing_off(ct: sitk.Image) -> sitk.Image:
    label = label_on(ct)
    label.SetSpacing((1.5, 1.5, 3.3))
    return label


def _non_ct(ct: sitk.Image) -> sitk.Image:
    array = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    return image


def _fractional(ct: sitk.Image) -> sitk.Image:
    label = label_on(ct, dtype=np.float32)
    return label * 0.5


# name -> (image maker, label maker, extra arguments, message); makers get (ct, folder).
BAD_INPUTS = {
    "label of another size": (None, lambda ct, d: _other_size(ct), [], "differs from image size"),
    "label of another direction": (None, lambda ct, d: _other_direction(ct), [], "direction"),
    "label two voxels off the grid": (None, lambda ct, d: _far_off_grid(ct), [],
                                      "does not lie on the image's grid"),
    "label spacing 10 % off": (None, lambda ct, d: _spacing_off(ct), [], "does not lie on the image's grid"),
    "label values 0, 3, 7": (None, lambda ct, d: label_on(ct, values=(3, 7)), [], "label values 0, 3, 7"),
    "non-integer label": (None, lambda ct, d: _fractional(ct), [], "non-integer"),
    "empty label": (None, lambda ct, d: label_on(ct, values=()), [], "label is empty"),
    "label value not present": (None, lambda ct, d: label_on(ct), ["--label-value", "4"],
                                "no voxel of value 4"),
    "label value zero": (None, lambda ct, d: label_on(ct), ["--label-value", "0"], "background"),
    "non-CT image": (lambda ct, d: _non_ct(ct), None, [], "does not look like CT"),
    "missing image": (lambda ct, d: d / "absent.nii.gz", None, [], "image not found"),
    "missing label": (None, lambda ct, d: d / "absent-label.nrrd", [], "label not found"),
    "unreadable label": (None, lambda ct, d: (d / "junk.nrrd").write_bytes(b"junk") and d / "junk.nrrd",
                         [], "cannot read label"),
    "2D label": (None, lambda ct, d: sitk.Image(40, 40, sitk.sitkUInt8), [], "is 2D"),
    "duplicate image": (lambda ct, d: small_ct(seed=9), None, [], "already in the library as case 'first'"),
    "taken id": (None, None, ["--id", "first"], "case id 'first' is already taken"),
    "invalid id": (None, None, ["--id", "../escape"], "invalid case id"),
    "too long id": (None, None, ["--id", "x" * 65], "invalid case id"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_exit_2_one_line_and_library_unchanged(tmp_path, capsys, case):
    home = tmp_path / "home"
    CaseLibrary(home / "cases").add(small_ct(seed=9), label_on(small_ct(seed=9)), case_id="first")
    make_image, make_label, extra, message = BAD_INPUTS[case]
    ct = small_ct()
    image = make_image(ct, tmp_path) if make_image else ct
    label = make_label(ct, tmp_path) if make_label else label_on(ct)
    image_path = image if isinstance(image, Path) else write(image, tmp_path / "ct.nii.gz")
    label_path = label if isinstance(label, Path) else write(label, tmp_path / "label.nrrd")
    before, entries = tree_snapshot(home), library_entries(home)

    status, out, err = in_process_cli(capsys, home, "add", str(image_path), str(label_path), *extra)

    assert status == 2, err
    assert message in err and err.count("\n") == 1 and err.startswith("lndgst: error: "), err
    assert out == ""
    assert tree_snapshot(home) == before and library_entries(home) == entries


def test_remove_unknown_or_invalid_id_is_exit_2(tmp_path, capsys):
    status, _, err = in_process_cli(capsys, tmp_path, "remove", "case-0042")
    assert status == 2 and "no case 'case-0042'" in err
    status, _, err = in_process_cli(capsys, tmp_path, "remove", "../models")
    assert status == 2 and "invalid case id" in err
    assert not (tmp_path / "cases").exists()


def test_cli_prints_the_resample_note(tmp_path, capsys):
    ct = small_ct()
    label = label_on(ct)
    label.SetOrigin(tuple(np.add(ct.GetOrigin(), (0.15, 0, 0))))
    status, out, err = in_process_cli(capsys, tmp_path, "add", str(write(ct, tmp_path / "ct.mha")),
                                      str(write(label, tmp_path / "label.mha")))
    assert status == 0 and out == "case-0001\n"
    assert err.startswith("lndgst: note: label resampled")


# ---------------------------------------------------------------- the real command line
def test_cli_add_list_remove_round_trip(tmp_path):
    home = tmp_path / "home"
    ct = small_ct()
    image_path, label_path = write(ct, tmp_path / "ct.nii.gz"), write(label_on(ct), tmp_path / "label.nii.gz")
    added = run_cli("cases", "add", str(image_path), str(label_path), "--id", "neck_01",
                    home=home, check_rc=0)
    assert added.stdout == "neck_01\n"

    listed = run_cli("cases", "list", home=home, check_rc=0)
    header, row = listed.stdout.splitlines()
    assert header.split()[0] == "ID" and row.split()[0] == "neck_01"
    assert "40x40x10" in row and row.split()[-1] == f"{144 * 1.5 * 1.5 * 3.0:.1f}"

    as_json = json.loads(run_cli("cases", "list", "--json", home=home, check_rc=0).stdout)
    assert [c["id"] for c in as_json] == ["neck_01"] and as_json[0]["label_voxels"] == 144
    assert Path(as_json[0]["folder"]) == home / "cases" / "neck_01"

    duplicate = run_cli("cases", "add", str(image_path), str(label_path), home=home)
    assert duplicate.returncode == 2 and "already in the library as case 'neck_01'" in duplicate.stderr
    assert duplicate.stderr.count("\n") == 1

    assert run_cli("cases", "remove", "neck_01", home=home, check_rc=0).stdout == "removed neck_01\n"
    assert run_cli("cases", "list", home=home, check_rc=0).stdout == "no cases\n"
    assert library_entries(home) == []


def test_same_voxels_in_another_format_or_pixel_type_are_a_duplicate(tmp_path):
    # Geometry that float32 NIfTI headers cannot hold exactly, unlike NRRD's decimal text.
    ct = small_ct(spacing_xyz=(0.7, 0.7, 2.1), origin=(-179.61, -201.33, -512.77))
    ct.SetDirection((0.6, 0.8, 0.0, -0.8, 0.6, 0.0, 0.0, 0.0, 1.0))
    library = CaseLibrary(tmp_path / "cases")
    nifti = write(ct, tmp_path / "ct.nii.gz")
    library.add(nifti, label_on(sitk.ReadImage(str(nifti))))
    before = tree_snapshot(library.root)
    for image in (write(ct, tmp_path / "ct.nrrd"), sitk.Cast(ct, sitk.sitkFloat32)):
        with pytest.raises(UserInputError, match="already in the library as case 'case-0001'"):
            library.add(image, label_on(ct))
    assert tree_snapshot(library.root) == before
    shifted = sitk.Image(ct)
    shifted.SetOrigin((-179.61, -201.33, -510.67))  # same voxels one slice further: another image
    assert library.add(shifted, label_on(shifted)).id == "case-0002"


def test_real_ct_with_a_manual_label(tmp_path):
    image_path, label_path = shared_file("sts/STS_002/image.nii.gz"), shared_file("sts/STS_002/label.nii.gz")
    record = CaseLibrary(tmp_path / "cases").add(image_path, label_path)
    source_label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    stored_label = sitk.GetArrayFromImage(sitk.ReadImage(str(record.label_path)))
    np.testing.assert_array_equal(stored_label, source_label > 0)
    assert record.metadata["notes"] == [] and record.metadata["label_voxels"] == int((source_label > 0).sum())
