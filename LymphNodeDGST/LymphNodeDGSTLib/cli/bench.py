"""`lndgst bench adapt`: the adaptation benchmark (DGST against every comparison method)."""

from __future__ import annotations

import argparse
from pathlib import Path

from LymphNodeDGSTLib.errors import EXIT_FAILURE, EXIT_OK, UserInputError
from LymphNodeDGSTLib.home import Home

COMMAND = "bench"


def register(commands: argparse._SubParsersAction) -> None:
    from LymphNodeDGSTLib.demo.bench_adapt.plan import METHODS

    bench = commands.add_parser("bench", help="benchmarks (adapt: DGST against the comparison methods)")
    benchmarks = bench.add_subparsers(dest="bench_command", parser_class=type(bench))
    adapt = benchmarks.add_parser(
        "adapt", help="adapt the demo model with every method on site-B phantoms and real CT labels",
        description="Defaults: all methods, shots 1,3,5, 2 seeds, 40 iterations, lr 1e-2 for every "
                    "method, 2 site-B and 1 site-A test phantoms, plus the real-label (STS) part; "
                    "about an hour on a quiet 2-core CPU.")
    adapt.add_argument("--output", default="bench-adapt-output", help="folder for runs.jsonl, results.md, "
                       "results.json and the figure (default bench-adapt-output)")
    adapt.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    adapt.add_argument("--shots", help="comma-separated site-B training case counts (default 1,3,5)")
    adapt.add_argument("--seeds", type=int, help="seeds 0..N-1: which site-B cases and training seed (default 2)")
    adapt.add_argument("--iterations", type=int, help="fine-tuning iterations, the same for every method (default 40)")
    adapt.add_argument("--lr", help="learning rate for every method (default 1e-2), or 'authors' for "
                       "each method's authors' rate")
    adapt.add_argument("--gamma", type=int, help="entries per kernel for dgst, random, static (default 2)")
    adapt.add_argument("--test-b", type=int, help="unseen site-B test phantoms (default 2)")
    adapt.add_argument("--test-a", type=int, help="unseen site-A phantoms for forgetting (default 1)")
    adapt.add_argument("--skip-sts", action="store_true", help="skip the real-label (soft-tissue sarcoma) part")
    adapt.add_argument("--skip-phantoms", action="store_true", help="skip the phantom part (real labels only)")
    adapt.add_argument("--sts", metavar="DIR", help="folder of STS_xxx/image.nii.gz + label.nii.gz "
                       "(default: $LNDGST_SHARED_DATA/sts or ../shared/data/sts)")
    adapt.add_argument("--smoke", action="store_true", help="tiny run for tests: none and dgst, 1 shot, "
                       "1 seed, 4 iterations, cropped images (under 90 s)")
    adapt.add_argument("--resume", action="store_true", help="keep the runs already in OUTPUT/runs.jsonl")
    adapt.add_argument("--report-only", action="store_true", help="run nothing: write the tables from "
                       "the runs already in OUTPUT/runs.jsonl (a cut-short benchmark)")
    adapt.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    adapt.add_argument("--shift", help="phantom site to adapt to: B (scanner and contrast, "
                       "default) or C (rim-enhancing flat nodes: the harder shift)")
    adapt.add_argument("--selection-only", action="store_true", help="sparse methods: freeze norms, "
                       "biases and head, so only the selected convolution entries move")
    adapt.add_argument("--attribution", action="store_true", help="sparse methods: also Dice with the "
                       "convolution changes undone and with the always-trained changes undone")
    adapt.add_argument("--tune-lr", metavar="LRS", help="comma-separated learning rates: per method, the "
                       "best on held-out training-site phantoms is used for the test runs")
    adapt.add_argument("--validation", type=int, help="held-out training-site phantoms scoring each "
                       "tuning run (default 2)")
    adapt.add_argument("--schedule", choices=("fixed", "auto"), help="fixed (default): --iterations "
                       "at --lr for every run; auto: each run takes the product's default path (the "
                       "site's cases split as `lndgst adapt` splits them, the rate chosen by probes on "
                       "the held-out case(s), early stop, best checkpoint)")
    adapt.add_argument("--rates", metavar="LRS", help="--schedule auto: the learning-rate grid the "
                       "probes try (default: the product's, 3e-3,1e-2,3e-2,1e-1)")
    for flag, what in (("--probe-iterations", "iterations of each rate probe"),
                       ("--check-every", "iterations between held-out checks"),
                       ("--patience", "checks without improvement before stopping"),
                       ("--max-iterations", "the cap on the training run's iterations")):
        adapt.add_argument(flag, type=int, help=f"--schedule auto: {what} (default: the product's)")
    adapt.add_argument("--crop", metavar="Z,Y,X", help="centre-crop every image to at most these voxels "
                       "(a cheaper protocol; the tables say so)")
    from LymphNodeDGSTLib.cli import bench_select
    bench_select.register(benchmarks)


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.demo.bench_adapt.plan import AUTO_SETTINGS, BenchConfig, smoke_config
    from LymphNodeDGSTLib.demo.bench_adapt import report_from_runs, run_benchmark

    if args.bench_command == "select":
        from LymphNodeDGSTLib.cli import bench_select
        return bench_select.handle(args, home)
    if args.bench_command != "adapt":
        raise UserInputError("bench: choose a benchmark: adapt")
    if args.report_only:
        outputs = report_from_runs(Path(args.output))
        print(outputs.table.read_text())
        return EXIT_OK
    config = smoke_config() if args.smoke else BenchConfig()
    if args.methods:
        config.methods = tuple(_names(args.methods))
    if args.shots:
        config.shots = tuple(_integers(args.shots, "--shots"))
    for option, name in (("seeds", "seeds"), ("iterations", "iterations"), ("gamma", "gamma"),
                         ("test_b", "site_b_tests"), ("test_a", "site_a_tests"),
                         ("validation", "validation_cases")):
        value = getattr(args, option)
        if value is not None:
            setattr(config, name, value)
    if args.lr is not None:
        config.learning_rate = None if args.lr == "authors" else _float(args.lr, "--lr")
    config.sts = not args.skip_sts
    config.phantoms = not args.skip_phantoms
    if not (config.sts or config.phantoms):
        raise UserInputError("--skip-sts with --skip-phantoms leaves nothing to run")
    config.sts_folder = args.sts
    config.device = args.device
    if args.shift:
        config.shift = args.shift
    config.selection_only = args.selection_only
    if args.schedule:
        config.schedule = args.schedule
        if args.schedule == "auto" and (args.iterations is not None or args.lr is not None):
            raise UserInputError("--schedule auto chooses iterations and rate: drop --iterations and --lr")
        if args.schedule == "auto":  # up to 4 probes and 500 iterations with checks: far past 40
            config.run_timeout_s = 4 * 3600.0
    if args.rates is not None:
        from LymphNodeDGSTLib.adaptation.schedule import parse_rates
        config.auto_settings["rates"] = list(parse_rates(args.rates))
    for name in AUTO_SETTINGS:
        if name != "rates" and getattr(args, name) is not None:
            config.auto_settings[name] = getattr(args, name)
    if args.crop:
        crop = _integers(args.crop, "--crop")
        if len(crop) != 3 or min(crop) < 16:
            raise UserInputError("--crop: give three sizes of at least 16 voxels, z,y,x (e.g. 32,96,96)")
        config.crop_zyx = tuple(crop)
    config.attribution = args.attribution
    if args.tune_lr:
        if args.lr is not None:
            raise UserInputError("--tune-lr and --lr exclude each other")
        config.tune_lrs = tuple(_float(item, "--tune-lr") for item in _names(args.tune_lr))
    outputs = run_benchmark(config, Path(args.output), resume=args.resume)
    print(outputs.table.read_text())
    return EXIT_FAILURE if outputs.failed else EXIT_OK


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(item) for item in _names(text)]
    except ValueError:
        raise UserInputError(f"{option}: give comma-separated whole numbers, e.g. 1,3,5") from None


def _float(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserInputError(f"{option}: give a number (e.g. 1e-2)"
                             + (" or 'authors'" if option == "--lr" else "")) from None

