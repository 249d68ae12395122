"""`lndgst bench select`: adaptation cases chosen by the ranking, at random, or by lowest uncertainty."""

from __future__ import annotations

import argparse
from pathlib import Path

from LymphNodeDGSTLib.errors import EXIT_FAILURE, EXIT_OK, UserInputError
from LymphNodeDGSTLib.home import Home


def register(benchmarks: argparse._SubParsersAction) -> None:
    select = benchmarks.add_parser(
        "select", help="does choosing the cases to correct by the ranking help adaptation?",
        description="Scores a pool of site-B phantoms with `rank`'s uncertainty, then adapts the demo "
                    "model (DGST, 40 iterations) on k cases chosen by the ranking, by random draws and by "
                    "the lowest uncertainty, and compares held-out site-B Dice, paired, with 95 %% intervals.")
    select.add_argument("--output", default="bench-select-output", help="folder for runs.jsonl, results.md/json")
    select.add_argument("--pool", type=int, default=20, help="site-B phantoms to choose from (default 20)")
    select.add_argument("--shots", default="1,3,5", help="comma-separated case counts (default 1,3,5)")
    select.add_argument("--draws", type=int, default=3, help="random draws per shot count (default 3)")
    select.add_argument("--test-b", type=int, default=4, help="unseen site-B test phantoms (default 4)")
    select.add_argument("--iterations", type=int, default=40, help="adaptation iterations (default 40)")
    select.add_argument("--workers", type=int, default=3,
                        help="processes at a time, the pool's scoring included (default 3)")
    select.add_argument("--crop", help="centre-crop every phantom to Z,Y,X voxels (smoke runs)")
    select.add_argument("--resume", action="store_true", help="keep the runs already in OUTPUT/runs.jsonl")
    select.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.demo.bench_select import SelectConfig, TABLE_FILE, run_benchmark

    try:
        shots = tuple(int(s) for s in args.shots.split(",") if s.strip())
        crop = tuple(int(s) for s in args.crop.split(",")) if args.crop else None
    except ValueError:
        raise UserInputError("--shots/--crop: give comma-separated whole numbers, e.g. 1,3,5") from None
    if crop is not None and len(crop) != 3:
        raise UserInputError("--crop: give Z,Y,X")
    config = SelectConfig(pool=args.pool, shots=shots, draws=args.draws, site_b_tests=args.test_b,
                          iterations=args.iterations, workers=args.workers, device=args.device, crop_zyx=crop)
    report = run_benchmark(config, Path(args.output), resume=args.resume)
    print((Path(args.output) / TABLE_FILE).read_text())
    return EXIT_FAILURE if report["failed"] else EXIT_OK
