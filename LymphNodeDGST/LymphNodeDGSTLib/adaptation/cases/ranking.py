"""Which CT should be corrected next: score a folder of CTs by the model's uncertainty and order
them, most useful first, with near-identical scans spread out (`diversity.py`).

A folder's entries are image files (NIfTI, NRRD, MHA, ...) and sub-folders (one DICOM series
each); hidden entries are ignored. Each entry is scored once per model version and image content
(`rank_cache.py`), so ranking a folder again scores only new or changed CTs. An entry that cannot
be scored (unreadable, 2D, not CT-like intensities, not an image) is kept in the output with its
reason; it never stops the ranking. The score is `UncertaintyScores.score` (engine/segmentation/uncertainty.py).
"""

from __future__ import annotations

import csv
import io
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from LymphNodeDGSTLib.adaptation.cases.diversity import diverse_order, image_features
from LymphNodeDGSTLib.adaptation.cases.rank_cache import RankCache, content_sha256, model_key
from LymphNodeDGSTLib.atomic import write_text_atomic
from LymphNodeDGSTLib.errors import Cancelled, UserInputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
CSV_COLUMNS = ("rank", "path", "score", "entropy_ml", "tta_ml", "entropy_mean", "tta_mean",
               "nodes", "near_misses", "predicted_ml", "doubtful_x_mm", "doubtful_y_mm",
               "doubtful_z_mm", "sha256", "cached", "status", "reason")

# progress(stage, done, total)
Progress = Callable[[str, int, int], None]


@dataclass
class RankedImage:
    path: str
    status: str = "ok"                      # "ok" or "skipped"
    reason: str = ""
    sha256: str = ""
    score: float | None = None
    cached: bool = False
    entry: dict = field(default_factory=dict)   # the cache entry (scores, nodes, features)
    rank: int | None = None

    @property
    def most_doubtful(self) -> dict | None:
        nodes = self.entry.get("node_doubts") or []
        return nodes[0] if nodes else None


def list_candidates(folder: str | os.PathLike) -> list[Path]:
    """The folder's visible entries, sorted by name; a missing folder is a usage error."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserInputError(f"not a folder: {folder}")
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def check_entry(path: Path) -> str | None:
    """Why an entry cannot be an image (None when it may be one)."""
    if path.is_dir():
        return None
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        return f"not an image file (use {', '.join(IMAGE_SUFFIXES[:4])}, ... or a DICOM folder)"
    if path.stat().st_size == 0:
        return "empty file"
    return None


def score_image(path: Path, segmenter, model, cache: RankCache, progress: Progress | None,
                cancel_event: threading.Event | None) -> RankedImage:
    """One entry's score, from the cache or from one uncertainty pass; never raises for bad
    input (the reason goes into the result); Cancelled and OutOfMemory pass through."""
    import SimpleITK as sitk

    from LymphNodeDGSTLib.adaptation.cases.library import image_sha256
    from LymphNodeDGSTLib.engine.segmentation.body_crop import find_body_box
    from LymphNodeDGSTLib.engine.images.files import ct_range_warning, read_image
    from LymphNodeDGSTLib.engine.segmentation.uncertainty import segment_with_uncertainty

    result = RankedImage(str(path))
    reason = check_entry(path)
    if reason:
        return _skipped(result, reason)
    try:
        result.sha256 = content_sha256(path)
    except OSError as error:
        return _skipped(result, f"unreadable: {error.strerror or error}")
    cached = cache.get(result.sha256)
    if cached is not None:
        result.entry, result.cached, result.score = cached, True, cached.get("score")
        if cached.get("status") == "skipped":
            return _skipped(result, cached.get("reason", "skipped"))
        return result
    try:
        image = read_image(path, "image")
    except UserInputError as error:
        return _skipped(result, str(error), cache)
    array = sitk.GetArrayFromImage(image)
    warning = ct_range_warning(array)
    if warning:
        return _skipped(result, f"not CT-like: {warning}", cache)
    outcome = segment_with_uncertainty(segmenter, image, model, progress=progress, cancel_event=cancel_event)
    spacing = list(image.GetSpacing())[::-1]
    box = find_body_box(array, spacing)
    entry = outcome.summary()
    entry["features"] = image_features(array, spacing, box.slices if box else None,
                                       outcome.scores.predicted_ml, outcome.scores.nodes)
    entry["image_sha256"] = image_sha256(image)  # the case library's voxel hash: marks library cases
    entry["status"] = "ok"
    cache.put(result.sha256, entry)
    result.entry, result.score = entry, entry["score"]
    return result


def _skipped(result: RankedImage, reason: str, cache: RankCache | None = None) -> RankedImage:
    result.status, result.reason, result.score = "skipped", reason.replace("\n", " "), None
    if cache is not None and result.sha256:
        cache.put(result.sha256, {"status": "skipped", "reason": result.reason})
    return result


def rank_folder(folder: str | os.PathLike, segmenter, model=None, cache_root: str | os.PathLike = ".",
                progress: Progress | None = None, cancel_event: threading.Event | None = None,
                log: Callable[[str], None] | None = None) -> list[RankedImage]:
    """Every entry of `folder`, scored and ordered: ranked CTs first (rank 1 = correct first),
    then the skipped entries with their reasons."""
    from LymphNodeDGSTLib.engine.segmentation.uncertainty import SCORE_VERSION

    entries = list_candidates(folder)
    version = segmenter._resolve(model)
    cache = RankCache(cache_root, model_key(version.ref, version.path, SCORE_VERSION))
    results = []
    for index, path in enumerate(entries):
        if cancel_event is not None and cancel_event.is_set():
            raise Cancelled("ranking cancelled")
        if progress:
            progress("rank", index, len(entries))
        try:
            item = score_image(path, segmenter, version, cache, progress, cancel_event)
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - one bad file never stops the ranking
            item = _skipped(RankedImage(str(path)), f"failed: {type(error).__name__}: {error}")
        if log:
            log(f"{path.name}: " + (f"score {item.score:.3f}" + (" (cached)" if item.cached else "")
                                    if item.status == "ok" else f"skipped ({item.reason})"))
        results.append(item)
    if progress:
        progress("rank", len(entries), len(entries))
    return order_results(results)


def order_results(results: list[RankedImage]) -> list[RankedImage]:
    ok = [r for r in results if r.status == "ok"]
    order = diverse_order([r.score or 0.0 for r in ok], [r.entry.get("features", [0.0]) for r in ok])
    ranked = [ok[i] for i in order]
    for rank, item in enumerate(ranked, 1):
        item.rank = rank
    return ranked + [r for r in results if r.status != "ok"]


def csv_text(results: list[RankedImage], top: int | None = None) -> str:
    """The ranking as CSV (columns CSV_COLUMNS): ranked rows (the first `top` of them when
    given), then every skipped entry."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    ranked = [r for r in results if r.status == "ok"]
    for item in (ranked[:top] if top else ranked) + [r for r in results if r.status != "ok"]:
        entry, node = item.entry, item.most_doubtful or {}
        point = node.get("centroid_lps_mm") or ("", "", "")
        writer.writerow([item.rank or "", item.path, _number(item.score), *(_number(entry.get(k)) for k in
                         ("entropy_ml", "tta_ml", "entropy_mean", "tta_mean")),
                         entry.get("nodes", ""), entry.get("near_misses", ""), _number(entry.get("predicted_ml")),
                         *point, item.sha256, int(item.cached), item.status, item.reason])
    return buffer.getvalue()


def write_csv(results: list[RankedImage], path: str | os.PathLike, top: int | None = None) -> Path:
    path = Path(path)
    write_text_atomic(path, csv_text(results, top))
    return path


def _number(value) -> str:
    if value is None or value == "":
        return ""
    return f"{float(value):.4f}" if isinstance(value, (float, np.floating)) else str(value)
