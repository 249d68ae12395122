"""CPU inference backends (engine/segmentation/backends/networks.py, choice.py, cache.py): equivalence
with torch on the tiny model, the per-version conversion cache, and the fallback to torch."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_ct, run_cli

from LymphNodeDGSTLib.engine.store.architectures import build_network, read_json, tiny_spec, write_results_folder
from LymphNodeDGSTLib.engine.segmentation.backends.cache import CACHE_DIR
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.engine.store.models import ModelStore

CONVERTED = [b for b, package in (("openvino", "openvino"), ("onnxruntime", "onnxruntime"))
             if __import__("importlib").util.find_spec(package) is not None]


class Recorder:
    """A progress callback that remembers the stages it saw."""

    def __init__(self):
        self.stages: list[str] = []

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.stages.append(stage)


def labels(segmenter: Segmenter, image, progress=None):
    result = segmenter.segment(image, model="tiny", fast=True, progress=progress)
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(result.label), result


def two_fold_model(folder: Path) -> Path:
    """The tiny architecture with two folds of different random weights."""
    from LymphNodeDGSTLib.engine.store.architectures import make_dataset_json, make_plans
    spec = tiny_spec()
    plans, dataset_json = make_plans(spec), make_dataset_json(spec.labels)
    for fold, seed in ((0, 1), (1, 2)):
        torch.manual_seed(seed)
        write_results_folder(folder, plans, dataset_json, build_network(plans, dataset_json).state_dict(),
                             fold=fold)
    return folder


@pytest.mark.skipif(not CONVERTED, reason="neither openvino nor onnxruntime is installed")
@pytest.mark.parametrize("backend", CONVERTED)
def test_backend_matches_torch_per_fold(tmp_path, backend):
    """Each fold's tile goes to that fold's conversion, within float tolerance of torch.
    Mutation caught (checked by hand, onnxruntime): BackendNetwork.load_state_dict not switching
    `active` (fold 1 runs fold 0's conversion: max logit difference 6.8). Measured OpenVINO f32
    difference on this model: 7e-5."""
    from LymphNodeDGSTLib.engine.segmentation.backends.networks import build_backend_network
    from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
    from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints

    folder = two_fold_model(tmp_path / "model")
    plans, dataset_json = read_json(folder / "plans.json"), read_json(folder / "dataset.json")
    checkpoints = list(find_checkpoints(folder).values())
    weights = [load_checkpoint(c)["network_weights"] for c in checkpoints]
    network = build_network(plans, dataset_json).eval()
    shape = (1, 1, *plans["configurations"]["3d_fullres"]["patch_size"])
    stand_in = build_backend_network(backend, network, weights, checkpoints, tmp_path / "cache", shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    reference = build_network(plans, dataset_json).eval()
    for fold_weights in weights:
        stand_in.load_state_dict(fold_weights)
        reference.load_state_dict(fold_weights)
        with torch.inference_mode():
            expected, got = reference(x), stand_in(x)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-3, rtol=1e-3), (got - expected).abs().max()


@pytest.mark.skipif("openvino" not in CONVERTED, reason="openvino is not installed")
def test_openvino_segmentation_equals_torch_and_reuses_its_cache(installed_home):
    """Whole segmenter (tiling, body crop, resampling) with OpenVINO: labels equal torch's on
    >= 99.9 % of voxels; the conversion is cached in the version's folder and a second segmenter
    (a new process in real use) loads it instead of converting again.
    Mutation caught (checked by hand): find_cached always returning None (the second run converts
    again, finds the key's folder taken and falls back to torch: result.backend is 'torch')."""
    store = ModelStore(installed_home / "models")
    image = make_ct()
    reference, _ = labels(Segmenter(store, device="cpu", backend="torch"), image)
    first_progress = Recorder()
    got, result = labels(Segmenter(store, device="cpu", backend="openvino"), image, first_progress)
    assert result.backend == "openvino" and result.backend_note is None
    assert "convert" in first_progress.stages
    assert (got == reference).mean() >= 0.999
    version = store.resolve("tiny")
    entries = [p for p in (version.path / CACHE_DIR).iterdir()]
    assert len(entries) == 1 and entries[0].name.startswith("openvino-")
    assert (entries[0] / "model.xml").is_file() and (entries[0] / "meta.json").is_file()

    second_progress = Recorder()
    again, result = labels(Segmenter(store, device="cpu", backend="openvino"), image, second_progress)
    assert result.backend == "openvino"
    assert "convert" not in second_progress.stages
    assert np.array_equal(again, got)


@pytest.mark.skipif("openvino" not in CONVERTED, reason="openvino is not installed")
def test_removed_version_drops_its_conversion(home, tmp_path):
    """A version removed and a new one published under the same number with other weights: the
    old conversion must not be used. Guards against (not mutation-checked by hand): a cache kept
    outside the version folder and keyed by NAME@N only (the new version would run the old
    network: labels differ)."""
    from LymphNodeDGSTLib.engine.store.architectures import create_random_model

    store = ModelStore(home / "models")
    store.install(create_random_model(tmp_path / "a", seed=0), name="tiny", show_progress=False)
    image = make_ct()
    labels(Segmenter(store, device="cpu", backend="openvino"), image)
    version = store.resolve("tiny@1")
    assert (version.path / CACHE_DIR).is_dir()
    shutil.rmtree(version.path)  # the version is removed: its conversions go with it
    (home / "models" / "tiny" / "state.json").unlink()
    store.install(create_random_model(tmp_path / "b", seed=5), name="tiny", show_progress=False)
    assert store.resolve("tiny").version == 1
    reference, _ = labels(Segmenter(store, device="cpu", backend="torch"), image)
    progress = Recorder()
    got, result = labels(Segmenter(store, device="cpu", backend="openvino"), image, progress)
    assert result.backend == "openvino" and "convert" in progress.stages
    assert (got == reference).mean() >= 0.999


def test_missing_package_falls_back_to_torch_with_one_line(installed_home, monkeypatch):
    """openvino absent (import fails): the explicit request runs torch and says why in one line;
    `auto` runs torch too. Mutation caught (checked by hand): attach_backend catching only
    ZeroDivisionError (the missing-package error escapes, the segmentation fails)."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    store = ModelStore(installed_home / "models")
    image = make_ct()
    reference, _ = labels(Segmenter(store, device="cpu", backend="torch"), image)
    got, result = labels(Segmenter(store, device="cpu", backend="openvino"), image)
    assert result.backend == "torch"
    assert "openvino" in result.backend_note and "\n" not in result.backend_note
    assert np.array_equal(got, reference)
    _, result = labels(Segmenter(store, device="cpu", backend="auto"), image)
    assert result.backend == "torch" and "openvino" in (result.backend_note or "")
    assert not (store.resolve("tiny").path / CACHE_DIR).exists()


@pytest.mark.skipif("openvino" not in CONVERTED, reason="openvino is not installed")
def test_failing_conversion_falls_back_and_leaves_no_partial_cache(installed_home, monkeypatch):
    """A converter that dies half-way: torch runs, the reason is given, and the cache holds no
    half-written entry. Mutation caught (checked by hand): store_conversion without its cleanup
    (a '.openvino-...tmp-' folder stays behind)."""
    from LymphNodeDGSTLib.engine.segmentation.backends import networks as backends

    def broken(fmt, network, example, folder):
        (folder / "model.xml").write_text("<half")
        raise RuntimeError("converter crashed\nsecond line")

    monkeypatch.setattr(backends, "convert", broken)
    store = ModelStore(installed_home / "models")
    _, result = labels(Segmenter(store, device="cpu", backend="openvino"), make_ct())
    assert result.backend == "torch"
    assert result.backend_note == "openvino unavailable (converter crashed); using torch"
    cache = store.resolve("tiny").path / CACHE_DIR
    assert list(cache.iterdir()) == []


@pytest.mark.skipif("openvino" not in CONVERTED, reason="openvino is not installed")
def test_auto_converts_in_the_background_then_uses_it(installed_home):
    """`auto` on a version without a conversion: this run uses torch at once and a background
    process converts; once it is done, the next run uses OpenVINO. Mutation caught (checked by
    hand): auto treated like an explicit backend (the first run reports 'openvino')."""
    import time

    from LymphNodeDGSTLib.engine.segmentation.backends.prepare import conversion_running

    store = ModelStore(installed_home / "models")
    image = make_ct()
    progress = Recorder()
    _, result = labels(Segmenter(store, device="cpu", backend="auto"), image, progress)
    assert result.backend == "torch" and "background" in result.backend_note
    assert "convert" not in progress.stages
    version = store.resolve("tiny")
    deadline = time.time() + 300
    while conversion_running(version.path, "openvino") and time.time() < deadline:
        time.sleep(1)
    assert not (version.path / CACHE_DIR / "openvino.error").exists()
    _, result = labels(Segmenter(store, device="cpu", backend="auto"), image)
    assert result.backend == "openvino" and result.backend_note is None


def test_cli_rejects_unknown_backend(installed_home, tmp_path):
    """A bad --backend is a usage error: one line, exit 2, nothing written."""
    source = tmp_path / "ct.nii.gz"
    import SimpleITK as sitk
    sitk.WriteImage(make_ct(), str(source))
    result = run_cli("segment", str(source), str(tmp_path / "label.nii.gz"), "--backend", "tpu",
                     home=installed_home)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "backend" in result.stderr
    assert not (tmp_path / "label.nii.gz").exists()


def test_panel_passes_the_backend_to_the_segment_job(home):
    """The panel's choice reaches the job's parameters; an unknown one is refused."""
    from LymphNodeDGSTLib.errors import UserInputError
    from LymphNodeDGSTLib.home import Home
    from LymphNodeDGSTLib.engine.segmentation.backends.names import BACKEND_CHOICES
    from LymphNodeDGSTLib.slicer_bridge.segment_section import SegmentationFiles, segment_job_params

    files = SegmentationFiles(home / "scratch")
    params = segment_job_params(files, Home(home), backend="onnxruntime")
    assert params["backend"] == "onnxruntime" and "auto" in BACKEND_CHOICES
    with pytest.raises(UserInputError):
        segment_job_params(files, Home(home), backend="tpu")
