"""`lndgst rank FOLDER`: which CTs to correct next, most useful first (a background job)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from LymphNodeDGSTLib.cli.options import add_device
from LymphNodeDGSTLib.errors import EXIT_OK, UserInputError
from LymphNodeDGSTLib.home import Home

COMMAND = "rank"


def register(commands: argparse._SubParsersAction) -> None:
    rank = commands.add_parser(
        "rank", help="rank a folder of CTs by how much correcting them would teach the model",
        description="Scores every CT of FOLDER (image files or DICOM series folders) with the model's "
                    "uncertainty (mirroring disagreement and softmax entropy in and around the predicted "
                    "nodes), orders them with near-identical scans spread out, and prints the ranking. "
                    "Scores are cached per image content: ranking again scores only new CTs.")
    rank.add_argument("folder", help="folder of CT files (NIfTI, NRRD, MHA, ...) or DICOM series folders")
    rank.add_argument("--model", help="NAME or NAME@VERSION (default: the active version)")
    rank.add_argument("--top", type=int, help="list only the K most useful CTs (skipped files are always listed)")
    rank.add_argument("--csv", metavar="OUT", help="write the ranking as CSV (path, score, ... one row per image)")
    add_device(rank)
    rank.add_argument("--detach", action="store_true", help="print the job id and return at once")
    rank.add_argument("--trust-checkpoint", action="store_true", help=argparse.SUPPRESS)


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.adaptation.cases.ranking import list_candidates
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device
    from LymphNodeDGSTLib.engine.store.models import ModelStore
    from LymphNodeDGSTLib.jobs.follow import follow_job
    from LymphNodeDGSTLib.jobs.manager import JobManager

    folder = Path(args.folder).expanduser().resolve()
    if not list_candidates(folder):
        raise UserInputError(f"nothing to rank: folder {folder} is empty")
    if args.top is not None and args.top < 1:
        raise UserInputError("--top must be at least 1")
    csv_path = _check_csv(args.csv)
    ModelStore(home.models).resolve(args.model)
    device = str(choose_device(args.device))
    manager = JobManager(home.jobs)
    params = {"folder": str(folder), "model": args.model, "device": device, "top": args.top,
              "csv": str(csv_path) if csv_path else None, "home": str(home.root),
              "trust_checkpoint": args.trust_checkpoint}
    job = manager.submit("rank", params, device=device)
    print(job.id, flush=True)
    if args.detach:
        return EXIT_OK
    status = follow_job(manager, job.id)
    result = manager.get(job.id).result or {}
    for row in result.get("ranked", []):
        node = row.get("most_doubtful") or {}
        where = node.get("centroid_lps_mm")
        print(f"{row['rank']:>4}  {row['score']:9.3f}  {row['path']}"
              + (f"  (most doubtful {node.get('kind')} at LPS {where[0]:.1f}, {where[1]:.1f}, {where[2]:.1f} mm)"
                 if where else ""))
    for row in result.get("skipped", []):
        print(f"   -  skipped    {row['path']}: {row['reason']}")
    if result.get("csv"):
        print(f"wrote {result['csv']}")
    return status


def _check_csv(raw: str | None) -> Path | None:
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if path.suffix.lower() != ".csv":
        raise UserInputError(f"--csv {raw}: use a .csv file name")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserInputError(f"--csv {raw}: folder {path.parent} does not exist or is not writable")
    return path
