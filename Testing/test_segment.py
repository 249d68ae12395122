"""Segmenter and `lndgst segment`: geometry, agreement with stock nnU-Net, progress, cancel, reloads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import make_ct, run_cli, tree_snapshot
from LymphNodeDGSTLib.errors import Cancelled, UserInputError
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.engine.store.models import ModelStore

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def oblique_direction(degrees: float = 20.0) -> tuple[float, ...]:
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)], [0, np.sin(angle / 2), np.cos(angle / 2)]])
    return tuple((rotation @ tilt).ravel())


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory, tiny_model_folder) -> Segmenter:
    store = ModelStore(tmp_path_factory.mktemp("home") / "models")
    store.install(tiny_model_folder, name="tiny", show_progress=False)
    return Segmenter(store, device="cpu")


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


@pytest.mark.parametrize("direction", [None, FLIPPED, oblique_direction()], ids=["identity", "flipped", "oblique"])
def test_output_is_on_the_input_grid(segmenter, direction):
    image = make_ct(shape_zyx=(20, 56, 60), spacing_xyz=(0.8, 1.3, 3.5), direction=direction,
                    origin=(-12.5, 30.25, -400.0))
    result = segmenter.segment(image, fast=True)
    assert_same_grid(result.label, image)
    assert result.label.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(result.label))) <= {0, 1}


def test_direction_does_not_change_the_labels(segmenter):
    """nnU-Net works in array space (as its SimpleITK reader does): only the geometry is copied."""
    plain = segmenter.segment(make_ct(), fast=True).label
    flipped = segmenter.segment(make_ct(direction=FLIPPED), fast=True).label
    assert np.array_equal(sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(flipped))


def test_matches_stock_nnunet_predictor(segmenter):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    image = make_ct(shape_zyx=(22, 60, 64), spacing_xyz=(1.1, 1.1, 2.5))
    array = sitk.GetArrayFromImage(image)
    for fast in (True, False):
        ours = segmenter.segment(image, fast=fast, crop_body=False).label
        stock = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=not fast, allow_tqdm=False)
        stock.initialize_from_trained_model_folder(str(segmenter.store.resolve("tiny").path), use_folds=(0,))
        expected = stock.predict_single_npy_array(array[None].astype(np.float32),
                                                  {"spacing": list(image.GetSpacing())[::-1]})
        assert np.array_equal(sitk.GetArrayFromImage(ours), expected), f"fast={fast}"


def test_progress_reports_every_tile_and_stages(segmenter):
    events = []
    segmenter.segment(make_ct(), fast=True, progress=lambda *e: events.append(e))
    tiles = [e for e in events if e[0] == "predict"]
    assert tiles and tiles[-1][1] == tiles[-1][2] == len(tiles)
    assert [d for _, d, _ in tiles] == list(range(1, len(tiles) + 1))
    assert {"preprocess", "resample"} <= {e[0] for e in events}


def test_cancel_from_another_thread(segmenter):
    cancel = threading.Event()

    def cancel_after_first_tile(stage, done, total):
        if stage == "predict" and done == 1:
            threading.Thread(target=cancel.set).start()

    with pytest.raises(Cancelled):
        segmenter.segment(make_ct(shape_zyx=(40, 96, 96)), fast=True, crop_body=False,
                          progress=cancel_after_first_tile, cancel_event=cancel)
    assert segmenter.segment(make_ct(), fast=True).label is not None  # still usable afterwards


def test_model_is_loaded_once_and_reloaded_when_active_version_changes(segmenter, tiny_model_folder):
    store = segmenter.store
    segmenter.segment(make_ct(), fast=True)
    first = segmenter._predictor
    segmenter.segment(make_ct(seed=1), fast=True)
    assert segmenter._predictor is first
    second = store.install(tiny_model_folder, name="tiny", show_progress=False, force=True)
    store.activate("tiny", second.version)
    try:
        segmenter.segment(make_ct(), fast=True)
        assert segmenter.loaded_version.ref == second.ref and segmenter._predictor is not first
        store.rollback("tiny")
        segmenter.segment(make_ct(), fast=True)
        assert segmenter.loaded_version.ref == "tiny@1"
    finally:
        if store.active_version("tiny") != 1:
            store.activate("tiny", 1)


def test_non_ct_intensities_give_a_warning(segmenter):
    image = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1, (16, 48, 48)).astype(np.float32))
    result = segmenter.segment(image, fast=True, crop_body=False)
    assert any("do not look like CT" in w for w in result.warnings)


def test_unknown_device_is_a_user_error(segmenter):
    with pytest.raises(UserInputError, match="unknown device"):
        Segmenter(segmenter.store, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="cuda requested"):
            Segmenter(segmenter.store, device="cuda")


def test_cli_segment_writes_label_and_node_report(installed_home, tmp_path):
    image = make_ct(direction=oblique_direction(), origin=(5.0, -3.0, 20.0))
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(source))
    output, nodes = tmp_path / "label.nii.gz", tmp_path / "nodes.csv"
    result = run_cli("segment", str(source), str(output), "--fast", "--nodes", str(nodes), home=installed_home)
    assert result.returncode == 0, result.stderr
    written = sitk.ReadImage(str(output))
    assert written.GetSize() == image.GetSize()
    assert np.allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
    header = nodes.read_text().splitlines()[0]
    assert "short_axis_mm" in header and "volume_mm3" in header


def test_cli_segment_reads_a_dicom_folder(installed_home, tmp_path):
    image = sitk.Cast(make_ct(shape_zyx=(12, 48, 48)), sitk.sitkInt16)
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        slice_image.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_image.SetMetaData("0020|0013", str(k))
        slice_image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")
        slice_image.SetMetaData("0008|0060", "CT")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    output = tmp_path / "label.mha"
    result = run_cli("segment", str(folder), str(output), "--fast", home=installed_home)
    assert result.returncode == 0, result.stderr
    assert sitk.ReadImage(str(output)).GetSize() == image.GetSize()


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return path


BAD_INPUTS = {
    "missing file": (lambda d: d / "absent.nii.gz", "input not found"),
    "unreadable file": (lambda d: ((d / "junk.nii.gz").write_bytes(b"not an image"), d / "junk.nii.gz")[1],
                        "cannot read input"),
    "2D image": (lambda d: _write(sitk.Image(32, 32, sitk.sitkInt16), d / "flat.nrrd"), "is 2D"),
    "4D image": (lambda d: _write(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), d / "time.nrrd"), "is 4D"),
    "empty DICOM folder": (lambda d: (d / "emptydir").mkdir() or d / "emptydir", "no DICOM series"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(installed_home, tmp_path, case):
    make, message = BAD_INPUTS[case]
    source = make(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = tree_snapshot(installed_home)
    result = run_cli("segment", str(source), str(out_dir / "label.nii.gz"), "--nodes",
                     str(out_dir / "nodes.csv"), home=installed_home)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert list(out_dir.iterdir()) == []
    assert tree_snapshot(installed_home) == before


@pytest.mark.parametrize("output, message", [
    ("missing-dir/label.nii.gz", "folder does not exist"),
    ("label.png", "unsupported extension"),
    ("readonly/label.nii.gz", "not writable"),
])
def test_bad_output_path_fails_before_any_work(installed_home, tmp_path, output, message):
    source = _write(make_ct(shape_zyx=(8, 32, 32)), tmp_path / "ct.nii.gz")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if message == "not writable" and readonly.stat().st_mode and _is_root_bypassing(readonly):
            pytest.skip("running as root: directory permissions are not enforced")
        result = run_cli("segment", str(source), str(tmp_path / output), home=installed_home)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    finally:
        readonly.chmod(0o755)


def _is_root_bypassing(folder) -> bool:
    import os
    return os.access(folder, os.W_OK)


def test_no_model_installed_is_a_clear_error(home, tmp_path):
    source = _write(make_ct(shape_zyx=(8, 32, 32)), tmp_path / "ct.nii.gz")
    result = run_cli("segment", str(source), str(tmp_path / "label.nii.gz"), home=home)
    assert result.returncode == 2 and "no model installed" in result.stderr
    assert not (tmp_path / "label.nii.gz").exists()


@pytest.mark.slow
def test_body_crop_matches_uncropped_run_inside_the_body(tmp_path):
    """Real head-and-neck CT, the trained demo model: cropping must not change the result."""
    from conftest import shared_file
    from LymphNodeDGSTLib.engine.segmentation.body_crop import find_body_box
    from LymphNodeDGSTLib.demo.demo_model import ensure_default_model, locate_demo_model
    from LymphNodeDGSTLib.adaptation.metrics import dice

    ct = shared_file("ct/hn_ct_pycerr.nii.gz")
    if locate_demo_model() is None:
        pytest.skip("demo model not built")
    store = ModelStore(tmp_path / "models")
    ensure_default_model(store)
    # A 48 mm slab through the neck (one tile deep), cut in-plane to the body's rows (about 1 cm
    # of air above and below) and, across, from 1 cm left of the body to the image's edge (16 cm
    # of air on that side): 35 tiles of the whole-image tiling, of which 25 touch the body (the
    # full 511 x 511 slab has 100 and 42: the same check at less than half the network time).
    image = sitk.ReadImage(str(ct))[133:, 93:375, 40:56]
    segmenter = Segmenter(store, device="cpu")
    whole = sitk.GetArrayFromImage(segmenter.segment(image, fast=True, crop_body=False).label)
    cropped_result = segmenter.segment(image, fast=True, crop_body=True)
    cropped = sitk.GetArrayFromImage(cropped_result.label)
    box = find_body_box(sitk.GetArrayViewFromImage(image), list(image.GetSpacing())[::-1])
    assert box is not None and cropped_result.body_fraction < 0.8
    inside = np.zeros(whole.shape, bool)
    inside[box.slices] = True
    assert whole[inside].sum() > 100, "the model should find something in a real neck CT"
    assert dice(cropped[inside], whole[inside]) >= 0.99
    assert not cropped[~inside].any()
