"""Adaptation end to end: trainer, pipeline, background job, report, activation, hot swap."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_cli, tree_snapshot
from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest, check_request, split_cases
from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.jobs.manager import JobManager
from LymphNodeDGSTLib.engine.store.models import ModelStore


def blob_case(seed: int, shape=(32, 64, 64)) -> tuple[sitk.Image, sitk.Image]:
    """Soft tissue with a bright round 'node' at a random place: an easy, learnable task."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    body = ((y - 32) / 28.0) ** 2 + ((x - 32) / 29.0) ** 2 <= 1
    array = np.where(body, 30.0, -1000.0)
    centre = rng.uniform([10, 20, 20], [22, 44, 44])
    radius = rng.uniform(6.0, 9.0)
    distance = np.sqrt(((z - centre[0]) * 2.0) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    label = (distance <= radius) & body
    array[label] = 220.0
    array[(y - 50) ** 2 + (x - 32) ** 2 <= 16] = 900.0
    array += rng.normal(0, 8, shape)
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((1.5, 1.5, 3.0))
    mask = sitk.GetImageFromArray(label.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


@pytest.fixture
def library_home(installed_home) -> Home:
    library = CaseLibrary(installed_home / "cases")
    for seed in range(4):
        library.add(*blob_case(seed))
    return Home(installed_home)


def test_split_holds_out_a_quarter_and_at_least_one_from_three(library_home):
    cases = CaseLibrary(library_home.cases).list()
    split = split_cases(cases, None, seed=0)
    assert len(split.evaluation) == 1 and len(split.training) == 3 and split.held_out
    assert not {c.id for c in split.evaluation} & {c.id for c in split.training}
    few = split_cases(cases[:2], None, seed=0)
    assert not few.held_out and few.evaluation == few.training
    with pytest.raises(UserInputError, match="at least one case must remain"):
        split_cases(cases, 4, seed=0)


def test_bad_requests_fail_before_any_training(installed_home, tiny_model_folder, tmp_path):
    home = Home(installed_home)
    with pytest.raises(UserInputError, match="case library is empty"):
        check_request(home, AdaptRequest())
    CaseLibrary(home.cases).add(*blob_case(0))
    with pytest.raises(UserInputError, match="unknown method"):
        check_request(home, AdaptRequest(method="magic"))
    with pytest.raises(UserInputError, match="gamma"):
        check_request(home, AdaptRequest(gamma=0))
    with pytest.raises(UserInputError, match="--selection-only needs a sparse method"):
        check_request(home, AdaptRequest(method="norm", selection_only=True))
    with pytest.raises(UserInputError, match="no model named"):
        check_request(home, AdaptRequest(model="nope"))
    three_labels = tmp_path / "three"
    import shutil
    shutil.copytree(tiny_model_folder, three_labels)
    dataset = json.loads((three_labels / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "node": 1, "vessel": 2}
    (three_labels / "dataset.json").write_text(json.dumps(dataset))
    from LymphNodeDGSTLib.engine.store.architectures import build_network, checkpoint_dict, read_json
    plans = read_json(three_labels / "plans.json")
    torch.save(checkpoint_dict(build_network(plans, dataset).state_dict(), plans, dataset),
               three_labels / "fold_0" / "checkpoint_final.pth")
    ModelStore(home.models).install(three_labels, name="multi", show_progress=False)
    with pytest.raises(UserInputError, match="segments 2 structures"):
        check_request(home, AdaptRequest(model="multi"))
    before = tree_snapshot(home.root)
    result = run_cli("adapt", "--model", "multi", home=home.root)
    assert result.returncode == 2 and "cannot be adapted" in result.stderr
    assert tree_snapshot(home.root) == before


@pytest.fixture
def site_b_home(home) -> Home:
    """The demo model (trained on site-A phantoms) and four corrected site-B phantoms: a real
    domain shift (contrast, thinner slices, noise, larger and necrotic nodes)."""
    from LymphNodeDGSTLib.demo.demo_model import ensure_default_model
    from LymphNodeDGSTLib.demo.phantom import generate_phantom

    assert ensure_default_model(ModelStore(home / "models")) == "lymphnode-demo@1"
    library = CaseLibrary(home / "cases")
    for seed in range(200, 204):
        phantom = generate_phantom("B", seed)
        library.add(phantom.image, phantom.label)
    return Home(home)


@pytest.mark.slow
def test_adapt_wait_publishes_a_better_version_with_report_and_figure(site_b_home):
    from LymphNodeDGSTLib.demo.bench_adapt.plan import cropped
    from LymphNodeDGSTLib.demo.phantom import generate_phantom

    store = ModelStore(site_b_home.models)
    segmenter = Segmenter(store, device="cpu")
    # the probe only shows which version the live segmenter uses: one sliding-window tile is enough
    probe = cropped(generate_phantom("B", 300).image, (32, 87, 87))
    segmenter.segment(probe, fast=True)
    assert segmenter.loaded_version.ref == "lymphnode-demo@1"

    result = run_cli("adapt", "--method", "dgst", "--iterations", "20", "--iterations-per-epoch", "10",
                     "--lr", "0.02", "--wait", home=site_b_home.root)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["version"] == "lymphnode-demo@2" and summary["parent"] == "lymphnode-demo@1"
    assert summary["dice_after"] > summary["dice_before"] + 0.1, summary  # seen: 0.585 -> 0.853
    assert summary["activated"] and store.active_version("lymphnode-demo") == 2

    version = store.resolve("lymphnode-demo@2")
    parent = store.resolve("lymphnode-demo@1")
    report = json.loads((version.path / "adaptation_report.json").read_text())
    assert report["method"] == "dgst" and report["gamma"] == 2 and report["evaluation_is_held_out"]
    assert report["parent_checkpoint_sha256"] == parent.metadata["checkpoint_sha256"]["0"]
    assert 0 < report["weights_changed_share"] < 0.5
    assert {"before", "after", "case"} <= set(report["per_case"][0])
    assert (version.path / "adaptation_report.png").read_bytes()[:4] == b"\x89PNG"
    stats = json.loads((version.path / "adaptation_stats.json").read_text())
    assert len(stats["entries_updated_per_iteration"]) == 20
    assert version.metadata["parent"] == 1 and version.metadata["method"] == "dgst"

    job = JobManager(site_b_home.jobs).list()[0]
    kinds = [e["type"] for e in JobManager(site_b_home.jobs).events(job.id)[0]]
    assert kinds[-1] == "done" and "metric" in kinds and "progress" in kinds

    segmenter.segment(probe, fast=True)   # hot swap: same live segmenter, new active version
    assert segmenter.loaded_version.ref == "lymphnode-demo@2"
    store.rollback("lymphnode-demo")
    segmenter.segment(probe, fast=True)
    assert segmenter.loaded_version.ref == "lymphnode-demo@1"


@pytest.mark.slow
def test_killed_worker_leaves_store_unchanged_and_releases_lock(library_home):
    store_before = tree_snapshot(library_home.models)
    started = run_cli("adapt", "--iterations", "2000", home=library_home.root, check_rc=0)
    job_id = started.stdout.strip()
    manager = JobManager(library_home.jobs)
    deadline = time.time() + 120
    while time.time() < deadline:
        info = manager.get(job_id)
        if info.last_progress and info.last_progress.get("stage") == "train":
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"training did not start: {manager.get(job_id)}")
    os.kill(manager.get(job_id).pid, signal.SIGKILL)
    deadline = time.time() + 20
    while manager.get(job_id).state == "running" and time.time() < deadline:
        time.sleep(0.2)
    assert manager.get(job_id).state == "failed"
    assert tree_snapshot(library_home.models) == store_before
    assert ModelStore(library_home.models).active_version("tiny") == 1
    # the lock of the dead worker is recovered: a new adaptation can start, then be cancelled
    second = run_cli("adapt", "--iterations", "2000", home=library_home.root, check_rc=0).stdout.strip()
    cancelled = manager.cancel(second, timeout=20)
    assert cancelled.state == "cancelled"
    assert tree_snapshot(library_home.models) == store_before
