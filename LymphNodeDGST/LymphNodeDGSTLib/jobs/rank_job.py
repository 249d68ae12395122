"""The `rank` job kind: score a folder of CTs by the model's uncertainty in a worker process.

Parameters (JSON): folder, and optionally model ("NAME" or "NAME@N"), device ("auto"), csv (a
path: the ranking is written there atomically), top (rows of the CSV's ranked part; skipped
entries are always listed), home (default as `lndgst` resolves it), trust_checkpoint (false).
Progress: stage "rank" per image and "predict" per sliding-window tile. A cancel stops before the
next tile; every CT scored so far stays in the cache (HOME/rank_cache), so the next run resumes.
The result holds the ranked rows (path, score, most doubtful node) and the skipped ones with reasons.
"""

from __future__ import annotations

import threading
from pathlib import Path

from LymphNodeDGSTLib.adaptation.cases.ranking import rank_folder, write_csv
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import resolve_home
from LymphNodeDGSTLib.jobs.events import Reporter


def run(params: dict, reporter: Reporter) -> dict:
    if not params.get("folder"):
        raise UserInputError("a rank job needs 'folder'")
    home = resolve_home(params.get("home"))
    store = ModelStore(home.models)
    store.resolve(params.get("model"))
    segmenter = Segmenter(store, device=params.get("device", "auto"),
                          trust_checkpoint=bool(params.get("trust_checkpoint", False)))
    cancel_event = threading.Event()
    position = {"image": 0, "images": 1}

    def progress(stage: str, done: int, total: int) -> None:
        """One bar for the whole folder: per mille, images plus the current image's tiles."""
        if stage == "rank":
            position.update(image=done, images=max(total, 1))
            fraction = 0.0
        else:
            fraction = done / total if stage == "predict" and total else 0.0
        overall = (position["image"] + min(fraction, 1.0)) / position["images"]
        reporter.progress(int(1000 * overall), 1000, stage="rank")
        if reporter.cancelled():
            cancel_event.set()

    reporter.log(f"ranking {params['folder']} on {segmenter.device}")
    results = rank_folder(params["folder"], segmenter, params.get("model"), home.root / "rank_cache",
                          progress, cancel_event, reporter.log)
    reporter.check_cancelled()
    top = params.get("top")
    if params.get("csv"):
        write_csv(results, Path(params["csv"]).expanduser(), top)
    ranked = [r for r in results if r.status == "ok"]
    return {"folder": str(params["folder"]), "csv": params.get("csv"),
            "ranked": [{"rank": r.rank, "path": r.path, "score": r.score, "cached": r.cached,
                        "sha256": r.sha256, "image_sha256": r.entry.get("image_sha256"),
                        "most_doubtful": r.most_doubtful}
                       for r in (ranked[:top] if top else ranked)],
            "skipped": [{"path": r.path, "reason": r.reason} for r in results if r.status != "ok"],
            "scored": sum(1 for r in ranked if not r.cached), "cached": sum(1 for r in ranked if r.cached)}
