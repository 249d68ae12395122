"""`lndgst segment INPUT_DIR OUTPUT_DIR`: a cohort folder, resumable, on one or several devices,
or one part of it (`--part K/N`); `lndgst cohort merge` joins the parts' CSVs.

Exit status: 0 every case segmented or resumed; 1 the batch ran but some cases failed (each
listed, and a `failed` row in the cohort CSV); 2 nothing could run (empty folder, output inside
the input, bad --part or --devices, no model), with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from LymphNodeDGSTLib.errors import EXIT_FAILURE, EXIT_OK, UserInputError
from LymphNodeDGSTLib.home import Home


def register_batch_options(segment: argparse.ArgumentParser) -> None:
    batch = segment.add_argument_group("folders (INPUT and OUTPUT folders: batch mode)")
    batch.add_argument("--devices", metavar="LIST",
                       help="one worker per device, e.g. cuda:0,cuda:1 (default: --device)")
    batch.add_argument("--part", metavar="K/N",
                       help="segment only part K of N (1..N) of the folder: N jobs cover it once")


def is_batch(args: argparse.Namespace) -> bool:
    """Folder in and an output without an image suffix (a folder): batch mode."""
    from LymphNodeDGSTLib.engine.images.files import WRITABLE_SUFFIXES

    batch = Path(args.input).is_dir() and not args.output.lower().endswith(WRITABLE_SUFFIXES)
    if not batch and (args.devices or args.part):
        raise UserInputError("--devices and --part work on folders: lndgst segment INPUT_DIR OUTPUT_DIR")
    return batch


def handle_batch(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.engine.cohort.batch import BatchSettings
    from LymphNodeDGSTLib.engine.cohort.device_workers import parse_devices
    from LymphNodeDGSTLib.engine.cohort.run import plan_cohort, run_cohort
    from LymphNodeDGSTLib.engine.store.models import ModelStore
    from LymphNodeDGSTLib.engine.cohort.parts import parse_part

    if args.nodes:
        raise UserInputError("--nodes is for one CT; a folder gets NAME.nodes.csv per case")
    part = parse_part(args.part)
    devices = parse_devices(args.devices, default=args.device)
    plan = plan_cohort(args.input, args.output, part)
    version = ModelStore(home.models).resolve(args.model)  # a bad model fails before any work
    settings = BatchSettings(str(home.models), version.ref, fast=args.fast, crop_body=not args.no_crop,
                             min_volume_mm3=args.min_volume, trust_checkpoint=args.trust_checkpoint)
    share = f"part {part.index}/{part.count}: " if not part.whole else ""
    print(f"{share}{len(plan.cases)} of {plan.total_cases} case(s) from {plan.input_dir}, "
          f"{version.ref}, devices {','.join(devices)}"
          + (f" ({len(plan.ignored)} non-image file(s) ignored)" if plan.ignored else ""),
          file=sys.stderr, flush=True)
    if not plan.cases:
        from LymphNodeDGSTLib.engine.cohort.table import write_cohort_csv
        plan.output_dir.mkdir(exist_ok=True)
        write_cohort_csv([], plan.csv_path)
        print(f"wrote {plan.csv_path} (this part has no cases)")
        return EXIT_OK

    def report(row, eta) -> None:
        what = (f"{row.nodes} node(s), {row.total_volume_mm3 or 0:.0f} mm3" if row.status != "failed"
                else f"FAILED: {row.message}")
        print(f"[{eta.done}/{eta.total}] {row.case}: {row.status}, {what}, {row.seconds or 0:.1f} s; "
              f"{eta.text()}", file=sys.stderr, flush=True)

    rows = run_cohort(plan, settings, devices, on_row=report)
    failed = [r for r in rows if r.status == "failed"]
    counts = {s: sum(r.status == s for r in rows) for s in ("segmented", "resumed", "failed")}
    print(f"wrote {plan.csv_path} ({counts['segmented']} segmented, {counts['resumed']} resumed, "
          f"{counts['failed']} failed)")
    for row in failed:
        print(f"lndgst: failed: {row.input}: {row.message}", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK
