"""`lndgst segment INPUT OUTPUT`: one CT to a label image (and optionally the node report)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from LymphNodeDGSTLib.cli.options import add_device
from LymphNodeDGSTLib.engine.segmentation.backends.names import BACKEND_CHOICES
from LymphNodeDGSTLib.errors import EXIT_OK, UserInputError
from LymphNodeDGSTLib.home import Home

COMMAND = "segment"


def register(commands: argparse._SubParsersAction) -> None:
    segment = commands.add_parser("segment", help="segment lymph nodes in a CT")
    segment.add_argument("input", help="CT image (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    segment.add_argument("output", help="label image to write (.nii.gz, .nrrd, .mha); "
                         "a folder when INPUT is a folder of CTs")
    segment.add_argument("--model", help="NAME or NAME@VERSION (default: the active version)")
    add_device(segment)
    segment.add_argument("--fast", action="store_true", help="no mirroring: faster, less accurate")
    segment.add_argument("--no-crop", action="store_true", help="run on the whole image, not the body")
    segment.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                         help="CPU inference backend (default auto: OpenVINO when installed, else "
                              "torch; bf16 or INT8 once a guard passed them for the model version; "
                              "see docs/benchmarks.md)")
    segment.add_argument("--nodes", metavar="CSV", help="also write the per-node report")
    segment.add_argument("--min-volume", type=float, default=0.0,
                         help="node report: ignore components smaller than this (mm^3)")
    segment.add_argument("--trust-checkpoint", action="store_true", help=argparse.SUPPRESS)
    from LymphNodeDGSTLib.cli.segment_batch import register_batch_options
    register_batch_options(segment)


def handle(args: argparse.Namespace, home: Home) -> int:
    from LymphNodeDGSTLib.engine.images.files import check_output_path, read_image, write_image_atomic
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.engine.store.models import ModelStore
    from LymphNodeDGSTLib.progress import TerminalProgress

    from LymphNodeDGSTLib.cli.segment_batch import handle_batch, is_batch
    if is_batch(args):
        return handle_batch(args, home)
    output = check_output_path(args.output, "output", inputs=[args.input])
    nodes_csv = Path(args.nodes) if args.nodes else None
    if nodes_csv is not None:
        _check_csv_path(nodes_csv, inputs=[args.input, args.output])
    image = read_image(args.input, "input")
    store = ModelStore(home.models)
    store.resolve(args.model)  # fail on a bad model name before loading anything
    segmenter = Segmenter(store, device=args.device, trust_checkpoint=args.trust_checkpoint,
                          backend=args.backend)
    with TerminalProgress() as progress:
        result = segmenter.segment(image, model=args.model, fast=args.fast,
                                   crop_body=not args.no_crop, progress=progress)
    for warning in result.warnings:
        print(f"lndgst: warning: {warning}", file=sys.stderr)
    if result.backend_note:
        print(f"lndgst: backend: {result.backend_note}", file=sys.stderr)
    write_image_atomic(result.label, output)
    from LymphNodeDGSTLib.engine.segmentation.backends.decision import backend_line
    backend = backend_line(result.backend, result.backend_detail)  # "openvino-bf16, guard Dice 0.9981"
    print(f"wrote {output} ({result.model}, {result.device}, {backend}, {result.seconds:.1f} s)")
    if nodes_csv is not None:
        from LymphNodeDGSTLib.engine.segmentation.nodes import node_report, write_node_csv
        rows = node_report(result.label, image, min_volume_mm3=args.min_volume)
        write_node_csv(rows, nodes_csv)
        print(f"wrote {nodes_csv} ({len(rows)} nodes)")
    return EXIT_OK


def _check_csv_path(path: Path, inputs: list[str]) -> None:
    from LymphNodeDGSTLib.engine.images.files import same_file

    parent = path.parent if str(path.parent) else Path(".")
    for other in inputs:
        if same_file(path, Path(other)):
            raise UserInputError(f"node report {path} is also {other}; choose another file")
    if path.suffix.lower() != ".csv":
        raise UserInputError(f"node report {path}: use a .csv file name")
    if not parent.is_dir():
        raise UserInputError(f"node report folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"node report folder is not writable: {parent}")
    if path.exists() and not path.is_file():  # a folder named x.csv: found now, not after the label
        raise UserInputError(f"node report {path} is a folder or a special file; choose another file")
