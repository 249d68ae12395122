"""Uncertainty per CT and `lndgst rank`: the score follows failure, the pass is `segment`'s,
the cache is reused, bad files are reported, near-duplicates are spread out."""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct, run_cli
from LymphNodeDGSTLib.adaptation.cases import ranking
from LymphNodeDGSTLib.adaptation.cases.diversity import diverse_order
from LymphNodeDGSTLib.adaptation.cases.ranking import csv_text, rank_folder
from LymphNodeDGSTLib.adaptation.cases.rank_cache import RankCache, well_formed
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.engine.segmentation.uncertainty import segment_with_uncertainty
from LymphNodeDGSTLib.errors import Cancelled


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory, tiny_model_folder) -> Segmenter:
    store = ModelStore(tmp_path_factory.mktemp("rank-home") / "models")
    store.install(tiny_model_folder, name="tiny", show_progress=False)
    return Segmenter(store, device="cpu")


def test_uncertainty_pass_gives_segments_accurate_label(tiny_segmenter):
    """The uncertainty pass is `segment` without --fast plus maps, not a different segmentation.
    Catches (checked by hand): one mirrored prediction left out of the average
    (`combinations[:-1]`); also meant for a label taken from the wrong channel."""
    image = make_ct(shape_zyx=(20, 56, 60), spacing_xyz=(1.1, 1.2, 3.0), seed=3)
    expected = tiny_segmenter.segment(image, fast=False).label
    result = segment_with_uncertainty(tiny_segmenter, image)
    assert np.array_equal(sitk.GetArrayFromImage(result.label), sitk.GetArrayFromImage(expected))
    assert result.mirrors == 8
    assert result.entropy.shape == result.disagreement.shape == sitk.GetArrayFromImage(image).shape
    assert 0 <= result.disagreement.min() and result.disagreement.max() <= 0.5
    assert result.disagreement.max() > 0  # random weights: mirrors disagree somewhere


def test_failing_phantom_ranks_above_succeeding_one(tmp_path):
    """The demo model (trained on site A) succeeds on a site-A phantom and fails on a site-B one;
    the site-B phantom must score higher and rank first. Both are cropped to one sliding-window
    tile. Catches (checked by hand): a score that ignores the maps (`score` returning a
    constant); also meant for a ranking in ascending order."""
    from LymphNodeDGSTLib.adaptation.metrics import image_dice
    from LymphNodeDGSTLib.demo.bench_adapt.plan import cropped
    from LymphNodeDGSTLib.demo.demo_model import locate_demo_model
    from LymphNodeDGSTLib.demo.phantom import generate_phantom

    store = ModelStore(tmp_path / "models")
    store.install(locate_demo_model(), name="demo", show_progress=False)
    segmenter = Segmenter(store, device="cpu")
    folder = tmp_path / "cts"
    folder.mkdir()
    dice = {}
    for site, seed, crop in (("A", 6000, (16, 80, 80)), ("B", 3000, (32, 87, 87))):
        phantom = generate_phantom(site, seed)
        image, truth = cropped(phantom.image, crop), cropped(phantom.label, crop)
        sitk.WriteImage(image, str(folder / f"site{site}.nii.gz"))
        dice[site] = image_dice(segmenter.segment(image, fast=True).label, truth)
    assert dice["A"] > 0.8 and dice["B"] < 0.6, dice  # known to succeed / to fail
    results = rank_folder(folder, segmenter, cache_root=tmp_path / "cache")
    scores = {Path(r.path).name: r.score for r in results}
    assert scores["siteB.nii.gz"] > scores["siteA.nii.gz"], scores
    assert Path(results[0].path).name == "siteB.nii.gz"
    assert results[0].most_doubtful is not None and len(results[0].most_doubtful["centroid_lps_mm"]) == 3


def _write_cts(folder: Path, seeds) -> None:
    folder.mkdir(exist_ok=True)
    for seed in seeds:
        sitk.WriteImage(make_ct(shape_zyx=(16, 48, 48), seed=seed), str(folder / f"ct{seed}.nrrd"))


def test_cache_is_reused_and_only_new_images_are_scored(tiny_segmenter, tmp_path, monkeypatch):
    """Catches (checked by hand): a cache that is never read (`cached = None`: 3 passes, not 1);
    also meant for a cache keyed by path (the renamed copy would be scored again)."""
    folder, cache = tmp_path / "cts", tmp_path / "cache"
    _write_cts(folder, [1, 2])
    first = rank_folder(folder, tiny_segmenter, cache_root=cache)
    assert [r.cached for r in first] == [False, False]

    calls = []
    import LymphNodeDGSTLib.engine.segmentation.uncertainty as uncertainty
    original = uncertainty.segment_with_uncertainty

    def counting(segmenter, image, *args, **kwargs):
        calls.append(image.GetSize())
        return original(segmenter, image, *args, **kwargs)

    monkeypatch.setattr(uncertainty, "segment_with_uncertainty", counting)
    (folder / "ct2.nrrd").rename(folder / "renamed.nrrd")
    _write_cts(folder, [3])
    second = rank_folder(folder, tiny_segmenter, cache_root=cache)
    by_name = {Path(r.path).name: r for r in second}
    assert len(calls) == 1, "only the new CT is scored"
    assert by_name["ct1.nrrd"].cached and by_name["renamed.nrrd"].cached and not by_name["ct3.nrrd"].cached
    assert by_name["renamed.nrrd"].score == {Path(r.path).name: r for r in first}["ct2.nrrd"].score


DAMAGED_ENTRIES = {
    "not JSON": b"{\"score\": 0.",
    "not UTF-8": b"\xff\xfe{}",
    "a list": b"[1, 2]",
    "score a string": {"score": "abc"},
    "score NaN": {"score": float("nan")},
    "features a string": {"features": "abc"},
    "node doubts a number": {"node_doubts": 5},
    "node without a position": {"node_doubts": [{"kind": "node", "doubt": 0.5}]},
    "skipped without a reason": {"status": "skipped", "reason": None},
}


@pytest.mark.parametrize("damage", list(DAMAGED_ENTRIES), ids=list(DAMAGED_ENTRIES))
def test_a_damaged_cache_entry_counts_as_missing(damage, tmp_path):
    """Issue 26, item 14. Catches: a cache entry that is valid JSON but not an entry (a list, a
    string score, features or doubts of the wrong type) returned as a hit, which failed the whole
    rank job or skipped a CT on every later run. The docs promise a damaged entry counts as missing."""
    cache = RankCache(tmp_path, "model")
    good = {"status": "ok", "score": 0.7, "features": [0.1, 0.2], "image_sha256": "ab",
            "node_doubts": [{"kind": "node", "doubt": 0.5, "centroid_lps_mm": [1.0, 2.0, 3.0]}]}
    cache.put("hash", good)
    assert cache.get("hash") == good
    damaged = DAMAGED_ENTRIES[damage]
    path = tmp_path / "model" / "hash.json"
    path.write_bytes(damaged if isinstance(damaged, bytes) else json.dumps({**good, **damaged}).encode())
    assert cache.get("hash") is None


def test_a_ranking_rescores_over_a_damaged_cache_entry(tiny_segmenter, tmp_path):
    """Issue 26, item 14, end to end: the entry replaced by a JSON list (AttributeError in the
    rank job before) is scored again and written again, whole."""
    folder, cache = tmp_path / "cts", tmp_path / "cache"
    _write_cts(folder, [1])
    first = rank_folder(folder, tiny_segmenter, cache_root=cache)
    [entry_file] = list(cache.rglob("*.json"))
    entry_file.write_text("[1, 2]")
    second = rank_folder(folder, tiny_segmenter, cache_root=cache)
    assert [(r.status, r.cached, r.score) for r in second] == [("ok", False, first[0].score)]
    assert well_formed(json.loads(entry_file.read_text()))


def test_bad_files_are_reported_per_file_and_the_job_completes(installed_home, tmp_path):
    """`lndgst rank` on a folder with one good CT and five bad entries: exit 0, every entry in
    the CSV, the bad ones skipped with their reason. Catches (checked by hand): the non-CT
    intensity check removed (the label image gets ranked); also meant for bad files dropped."""
    folder = tmp_path / "mixed"
    _write_cts(folder, [1])
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(folder / "slice2d.nrrd"))
    label = sitk.Image(24, 24, 8, sitk.sitkUInt8)
    sitk.WriteImage(label, str(folder / "label.nrrd"))
    (folder / "emptydir").mkdir()
    out = tmp_path / "ranking.csv"
    completed = run_cli("rank", str(folder), "--csv", str(out), "--device", "cpu", home=installed_home)
    assert completed.returncode == 0, completed.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"ct1.nrrd", "notes.txt", "broken.nii.gz", "slice2d.nrrd", "label.nrrd", "emptydir"}
    assert by_name["ct1.nrrd"]["status"] == "ok" and by_name["ct1.nrrd"]["rank"] == "1"
    assert float(by_name["ct1.nrrd"]["score"]) >= 0
    reasons = {name: row["reason"] for name, row in by_name.items() if row["status"] == "skipped"}
    assert "not an image file" in reasons["notes.txt"]
    assert "cannot read" in reasons["broken.nii.gz"]
    assert "2D" in reasons["slice2d.nrrd"]
    assert "not CT-like" in reasons["label.nrrd"]
    assert "DICOM" in reasons["emptydir"]
    assert "skipped" in completed.stdout


def test_empty_folder_and_bad_options_are_usage_errors(installed_home, tmp_path):
    (tmp_path / "empty").mkdir()
    for args, message in (([str(tmp_path / "empty")], "empty"), ([str(tmp_path / "nope")], "not a folder"),
                          ([str(tmp_path / "empty"), "--csv", str(tmp_path / "x.txt")], "")):
        completed = run_cli("rank", *args, home=installed_home)
        assert completed.returncode == 2
        assert len(completed.stderr.strip().splitlines()) == 1 and message in completed.stderr


def test_cancel_keeps_what_was_scored(tiny_segmenter, tmp_path):
    """A cancel raises Cancelled; the images scored before it stay in the cache."""
    folder, cache = tmp_path / "cts", tmp_path / "cache"
    _write_cts(folder, [1, 2])
    cancel = threading.Event()

    def progress(stage, done, total):
        if stage == "rank" and done == 1:
            cancel.set()

    with pytest.raises(Cancelled):
        rank_folder(folder, tiny_segmenter, cache_root=cache, progress=progress, cancel_event=cancel)
    again = rank_folder(folder, tiny_segmenter, cache_root=cache)
    assert sorted(r.cached for r in again) == [False, True]


def test_diverse_order_spreads_near_duplicates():
    """Two near-identical top scans: the second one drops behind a different, less uncertain
    scan. Catches (checked by hand): ordering by score alone (FLOOR = 1)."""
    scores = [1.0, 0.98, 0.7, 0.1]
    features = [[0.0, 0.0], [0.01, 0.0], [5.0, 5.0], [5.0, -5.0]]
    assert diverse_order(scores, features) == [0, 2, 1, 3]
    assert diverse_order(scores, [[1.0, 1.0]] * 4) == [0, 1, 2, 3]  # no spread: by score
    assert diverse_order([], []) == []


def test_csv_top_keeps_skipped_rows():
    """Catches: --top cutting the skipped rows, and the node count column holding the node list
    (the per-node doubts once overwrote the count in the cache entry)."""
    doubt = {"kind": "node", "doubt": 0.5, "centroid_lps_mm": [1.0, 2.0, 3.0]}
    items = [ranking.RankedImage(f"/x/{i}.nrrd", score=float(i), rank=i + 1,
                                 entry={"nodes": 2, "node_doubts": [doubt]}) for i in range(3)]
    items.append(ranking.RankedImage("/x/bad.txt", status="skipped", reason="not an image file"))
    rows = list(csv.DictReader(io.StringIO(csv_text(items, top=1))))
    assert [r["path"] for r in rows] == ["/x/0.nrrd", "/x/bad.txt"]
    assert {"path", "score"} <= set(rows[0])
    assert rows[0]["nodes"] == "2" and rows[0]["doubtful_z_mm"] == "3.0"
    assert rows[1]["status"] == "skipped" and rows[1]["reason"] == "not an image file"
