"""The bundled demo model and `lndgst demo`."""

from __future__ import annotations

import re

import pytest

from LymphNodeDGSTLib.demo.demo_model import DEMO_MODEL_NAME, ensure_default_model, locate_demo_model
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.adaptation.metrics import image_dice
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.demo.phantom import generate_phantom


def test_demo_model_is_installed_only_into_an_empty_store(tmp_path, tiny_model_folder):
    assert locate_demo_model() is not None, "the demo model zip must ship with the module"
    store = ModelStore(tmp_path / "models")
    assert ensure_default_model(store) == f"{DEMO_MODEL_NAME}@1"
    assert ensure_default_model(store) is None
    other = ModelStore(tmp_path / "other")
    other.install(tiny_model_folder, name="mine", show_progress=False)
    assert ensure_default_model(other) is None and other.names() == ["mine"]


def test_demo_model_segments_an_unseen_site_a_phantom(tmp_path):
    store = ModelStore(tmp_path / "models")
    ensure_default_model(store)
    segmenter = Segmenter(store, device="cpu")
    scores = []
    for seed in (7001, 7002):
        phantom = generate_phantom("A", seed)
        label = segmenter.segment(phantom.image, fast=True).label
        scores.append(image_dice(label, phantom.label))
    assert min(scores) >= 0.7, scores


@pytest.mark.slow
def test_shortened_demo_runs_the_whole_loop(tmp_path, capsys, monkeypatch):
    import LymphNodeDGSTLib.demo.phantom as phantom_module
    from dataclasses import replace

    from LymphNodeDGSTLib.demo.bench_adapt.plan import cropped
    from LymphNodeDGSTLib.demo.run_demo import run_demo

    def centre_slab(site: str, seed: int):
        whole = generate_phantom(site, seed)
        return replace(whole, image=cropped(whole.image, (32, 128, 128)), label=cropped(whole.label, (32, 128, 128)))

    # every step of the loop at its smallest: centre slabs of the phantoms (each segmentation a few
    # tiles; `make demo` runs the whole phantoms), one corrected case (also the evaluation case:
    # none can be held out), two iterations, one unseen test phantom
    monkeypatch.setattr(phantom_module, "generate_phantom", centre_slab)
    output = tmp_path / "demo"
    assert run_demo(Home(tmp_path / "unused"), output, device="cpu", iterations=2, cases=1, tests=1) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"dice_before=\d\.\d{3} dice_after=\d\.\d{3}", lines[-1]), lines[-1]
    for name in ("overlay_before.png", "overlay_after.png", "adaptation_report.png", "demo_summary.json",
                 "patient_label_before.nii.gz", "patient_label_after.nii.gz"):
        assert (output / name).is_file(), name
    store = ModelStore(output / "home" / "models")
    assert [v.version for v in store.versions(DEMO_MODEL_NAME)] == [1, 2]
