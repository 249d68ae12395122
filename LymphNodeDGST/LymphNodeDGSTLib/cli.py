"""The `lndgst` command line (also `python -m LymphNodeDGSTLib`).

Exit status: 0 success; 2 bad input or usage (one clear line on stderr, nothing written);
1 unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from LymphNodeDGSTLib.errors import Cancelled, OutOfMemory, UserInputError
from LymphNodeDGSTLib.home import Home, resolve_home

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
METHODS = ("dgst", "full", "bias", "norm", "lora", "random", "static")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserInputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lndgst", description=__doc__.split("\n")[0])
    parser.add_argument("--home", help="home folder (default $LNDGST_HOME or ~/.lymphnode-dgst)")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    models = commands.add_parser("models", help="install, list, activate, roll back, export models")
    model_commands = models.add_subparsers(dest="models_command", parser_class=_Parser)
    install = model_commands.add_parser("install", help="install an nnU-Net results folder, zip or URL")
    install.add_argument("source", help="results folder, zip of one, or http(s) URL of a zip")
    install.add_argument("--name", help="model name (default: the dataset name in plans.json)")
    install.add_argument("--sha256", help="expected SHA-256 of the zip or download")
    install.add_argument("--trust-checkpoint", action="store_true",
                         help="allow checkpoints that need arbitrary unpickling (trusted sources only)")
    model_commands.add_parser("list", help="installed models and versions (* = active)")
    activate = model_commands.add_parser("activate", help="make NAME@VERSION the active version")
    activate.add_argument("spec", metavar="NAME@VERSION")
    rollback = model_commands.add_parser("rollback", help="re-activate the previously active version")
    rollback.add_argument("name")
    export = model_commands.add_parser("export", help="write a plain nnU-Net results folder")
    export.add_argument("spec", metavar="NAME@VERSION")
    export.add_argument("destination")

    segment = commands.add_parser("segment", help="segment lymph nodes in a CT")
    segment.add_argument("input", help="CT image (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    segment.add_argument("output", help="label image to write (.nii.gz, .nrrd, .mha)")
    segment.add_argument("--model", help="NAME or NAME@VERSION (default: the active version)")
    _add_device(segment)
    segment.add_argument("--fast", action="store_true", help="no mirroring: faster, less accurate")
    segment.add_argument("--no-crop", action="store_true", help="run on the whole image, not the body")
    segment.add_argument("--nodes", metavar="CSV", help="also write the per-node report")
    segment.add_argument("--min-volume", type=float, default=0.0,
                         help="node report: ignore components smaller than this (mm^3)")
    segment.add_argument("--trust-checkpoint", action="store_true", help=argparse.SUPPRESS)

    for register in _EXTRA_COMMANDS:
        register(commands)

    demo = commands.add_parser("demo", help="the whole loop on the demo model and phantoms")
    demo.add_argument("--output", default="demo-output", help="folder for the demo's files")
    demo.add_argument("--iterations", type=int, default=None, help="adaptation iterations")
    _add_device(demo)
    return parser


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")


# Later modules register their sub-commands here (cases, adapt, jobs, phantom, bench).
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []
_HANDLERS: dict[str, Callable[[argparse.Namespace, Home], int]] = {}


def main(argv: Sequence[str] | None = None) -> int:
    _load_command_modules()
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            from LymphNodeDGSTLib import __version__
            print(__version__)
            return EXIT_OK
        if not args.command:
            build_parser().print_help()
            return EXIT_USAGE
        home = resolve_home(args.home)
        return _dispatch(args, home)
    except UserInputError as error:
        print(f"lndgst: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Cancelled as error:
        print(f"lndgst: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except OutOfMemory as error:
        print(f"lndgst: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("lndgst: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - last resort: say it is a bug, keep the traceback
        traceback.print_exc()
        print("lndgst: unexpected failure (a bug: please report it with the lines above)",
              file=sys.stderr)
        return EXIT_FAILURE


def _load_command_modules() -> None:
    """Import the modules that register extra sub-commands (kept out of `import cli`)."""
    import importlib

    for name in ("cases_cli", "adapt_cli", "jobs_cli", "phantom_cli", "bench_cli"):
        try:
            importlib.import_module(f"LymphNodeDGSTLib.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"LymphNodeDGSTLib.{name}":
                raise


def register_command(register: Callable[[argparse._SubParsersAction], None],
                     handlers: dict[str, Callable[[argparse.Namespace, Home], int]]) -> None:
    if register not in _EXTRA_COMMANDS:
        _EXTRA_COMMANDS.append(register)
    _HANDLERS.update(handlers)


def _dispatch(args: argparse.Namespace, home: Home) -> int:
    if args.command == "models":
        return _models(args, home)
    if args.command == "segment":
        return _segment(args, home)
    if args.command == "demo":
        from LymphNodeDGSTLib.demo import run_demo
        return run_demo(home, Path(args.output), device=args.device, iterations=args.iterations)
    return _HANDLERS[args.command](args, home)


def _models(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.models import ModelStore, format_version_line, parse_model_spec

    store = ModelStore(home.models)
    command = args.models_command
    if command == "install":
        version = store.install(args.source, name=args.name, sha256=args.sha256,
                                trust_checkpoint=args.trust_checkpoint)
        print(version.ref)
    elif command == "list":
        names = store.names()
        if not names:
            print("no models installed")
        for name in names:
            active = store.active_version(name)
            print(name)
            for version in store.versions(name):
                print("  " + format_version_line(version, active))
    elif command == "activate":
        name, number = parse_model_spec(args.spec)
        if number is None:
            raise UserInputError("activate needs NAME@VERSION")
        print(store.activate(name, number).ref)
    elif command == "rollback":
        print(store.rollback(args.name).ref)
    elif command == "export":
        _, number = parse_model_spec(args.spec)
        if number is None:
            args.spec = store.resolve(args.spec).ref
        print(store.export(args.spec, args.destination))
    else:
        raise UserInputError("models: choose one of install, list, activate, rollback, export")
    return EXIT_OK


def _segment(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.images import check_output_path, read_image, write_image_atomic
    from LymphNodeDGSTLib.inference import Segmenter
    from LymphNodeDGSTLib.models import ModelStore
    from LymphNodeDGSTLib.progress import TerminalProgress

    output = check_output_path(args.output, "output")
    nodes_csv = Path(args.nodes) if args.nodes else None
    if nodes_csv is not None:
        _check_csv_path(nodes_csv)
    image = read_image(args.input, "input")
    store = ModelStore(home.models)
    store.resolve(args.model)  # fail on a bad model name before loading anything
    segmenter = Segmenter(store, device=args.device, trust_checkpoint=args.trust_checkpoint)
    with TerminalProgress() as progress:
        result = segmenter.segment(image, model=args.model, fast=args.fast,
                                   crop_body=not args.no_crop, progress=progress)
    for warning in result.warnings:
        print(f"lndgst: warning: {warning}", file=sys.stderr)
    write_image_atomic(result.label, output)
    print(f"wrote {output} ({result.model}, {result.device}, {result.seconds:.1f} s)")
    if nodes_csv is not None:
        from LymphNodeDGSTLib.nodes import node_report, write_node_csv
        rows = node_report(result.label, image, min_volume_mm3=args.min_volume)
        write_node_csv(rows, nodes_csv)
        print(f"wrote {nodes_csv} ({len(rows)} nodes)")
    return EXIT_OK


def _check_csv_path(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.suffix.lower() != ".csv":
        raise UserInputError(f"node report {path}: use a .csv file name")
    if not parent.is_dir():
        raise UserInputError(f"node report folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"node report folder is not writable: {parent}")


if __name__ == "__main__":
    sys.exit(main())
