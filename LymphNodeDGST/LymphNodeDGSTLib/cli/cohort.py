"""`lndgst cohort merge`: one cohort CSV from the parts' CSVs (`segment --part K/N`)."""

from __future__ import annotations

import argparse

from LymphNodeDGSTLib.errors import EXIT_OK
from LymphNodeDGSTLib.home import Home

COMMAND = "cohort"


def register(commands: argparse._SubParsersAction) -> None:
    cohort = commands.add_parser("cohort", help="cohort CSVs of batch segmentation")
    actions = cohort.add_subparsers(dest="cohort_action", required=True)
    merge = actions.add_parser("merge", help="merge cohort.part-K-of-N.csv files into one CSV")
    merge.add_argument("sources", nargs="+",
                       help="part CSV files, or output folders holding cohort.part-K-of-N.csv")
    merge.add_argument("-o", "--output", required=True, help="merged CSV to write")


def handle(args: argparse.Namespace, home: Home) -> int:
    from pathlib import Path

    from LymphNodeDGSTLib.engine.cohort.table import merge_cohort_csvs
    from LymphNodeDGSTLib.errors import UserInputError

    output = Path(args.output)
    if output.suffix.lower() != ".csv":
        raise UserInputError(f"{output}: use a .csv file name")
    if not (output.parent if str(output.parent) else Path(".")).is_dir():
        raise UserInputError(f"output folder does not exist: {output.parent}")
    rows = merge_cohort_csvs(args.sources, output)
    failed = sum(r.status == "failed" for r in rows)
    print(f"wrote {output} ({len(rows)} cases, {failed} failed)")
    return EXIT_OK
