"""`lndgst cases add | list | remove`: the site case library on the command line."""

from __future__ import annotations

import argparse
import json
import sys

from LymphNodeDGSTLib.errors import EXIT_OK, UserInputError
from LymphNodeDGSTLib.home import Home

COMMAND = "cases"


def register(commands: argparse._SubParsersAction) -> None:
    cases = commands.add_parser("cases", help="the site case library: corrected CT + label pairs")
    case_commands = cases.add_subparsers(dest="cases_command", parser_class=type(cases))
    add = case_commands.add_parser("add", help="add a CT and its corrected lymph-node label")
    add.add_argument("image", help="CT image (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    add.add_argument("label", help="label image on the CT's grid: 0 background, 1 lymph node")
    add.add_argument("--id", dest="case_id", metavar="ID",
                     help="case id (letters, digits, _ and -; default case-NNNN)")
    add.add_argument("--label-value", type=int, metavar="V",
                     help="take voxels equal to V as lymph node and all other values as background")
    add.add_argument("--keep-source-name", action="store_true",
                     help="record the input file names (not kept by default: they may identify patients)")
    listing = case_commands.add_parser("list", help="the cases: id, date added, size, label volume")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    remove = case_commands.add_parser("remove", help="remove a case")
    remove.add_argument("case_id", metavar="ID")


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary

    library = CaseLibrary(home.cases)
    command = args.cases_command
    if command == "add":
        record = library.add(args.image, args.label, case_id=args.case_id,
                             label_value=args.label_value, keep_source_name=args.keep_source_name)
        for note in record.metadata.get("notes", []):
            print(f"lndgst: note: {note}", file=sys.stderr)
        print(record.id)
    elif command == "list":
        records, problems = library.survey()
        for problem in problems:  # the readable cases are still listed
            print(f"lndgst: damaged case: {problem}", file=sys.stderr)
        if args.json:
            print(json.dumps([{**r.metadata, "folder": str(r.folder)} for r in records], indent=2))
        else:
            print(format_case_table([r.metadata for r in records]))
    elif command == "remove":
        library.remove(args.case_id)
        print(f"removed {args.case_id}")
    else:
        raise UserInputError("cases: choose one of add, list, remove")
    return EXIT_OK


def format_case_table(cases: list[dict]) -> str:
    """One line per case: id, date added (UTC), size, label volume."""
    if not cases:
        return "no cases"
    rows = [("ID", "ADDED (UTC)", "SIZE", "LABEL mm3")]
    for case in cases:
        added = str(case.get("added", "")).replace("T", " ")[:16]
        size = "x".join(str(n) for n in case.get("size", []))
        rows.append((case["id"], added, size, f"{case.get('label_volume_mm3', 0):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3].rjust(10)
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)

