"""The `segment` job kind: segmentation in a worker process, so the Slicer GUI never blocks.

Parameters (JSON): input (CT file or DICOM folder), output (label file), and optionally model
("NAME" or "NAME@N"), device ("auto"), fast (false), crop_body (true), nodes_csv (a path),
min_volume_mm3 (0), backend ("auto"; a first use converts the model here, in the worker),
home (the LNDGST home whose models/ to use; default as `lndgst` resolves it),
trust_checkpoint (false). Progress is reported per stage, sliding-window tiles included; a cancel
stops before the next tile and nothing is written. The label is written atomically on the input's
exact grid; the result counts the nodes, and the node report is written when asked for.
"""

from __future__ import annotations

import threading
from pathlib import Path

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import resolve_home
from LymphNodeDGSTLib.engine.images.files import check_output_path, read_image, write_image_atomic
from LymphNodeDGSTLib.engine.segmentation.backends.decision import backend_line
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
from LymphNodeDGSTLib.jobs.events import Reporter
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.engine.segmentation.nodes import node_report, write_node_csv


def run(params: dict, reporter: Reporter) -> dict:
    if not params.get("input") or not params.get("output"):
        raise UserInputError("a segment job needs 'input' and 'output'")
    output = check_output_path(Path(params["output"]).expanduser(), "output",
                               inputs=[Path(params["input"]).expanduser()])
    nodes_csv = _check_csv_path(params.get("nodes_csv"))
    home = resolve_home(params.get("home"))
    reporter.check_cancelled()

    image = read_image(Path(params["input"]).expanduser(), "input")
    store = ModelStore(home.models)
    store.resolve(params.get("model"))  # a bad model name fails before anything is loaded
    segmenter = Segmenter(store, device=params.get("device", "auto"),
                          trust_checkpoint=bool(params.get("trust_checkpoint", False)),
                          backend=params.get("backend", "auto"))
    reporter.log(f"segmenting {params['input']} on {segmenter.device}")
    cancel_event = threading.Event()

    def progress(stage: str, done: int, total: int) -> None:
        reporter.progress(done, total, stage=stage)
        if reporter.cancelled():
            cancel_event.set()

    result = segmenter.segment(image, model=params.get("model"), fast=bool(params.get("fast")),
                               crop_body=bool(params.get("crop_body", True)), progress=progress,
                               cancel_event=cancel_event)
    for warning in result.warnings:
        reporter.log(f"warning: {warning}")
    if result.backend_note:
        reporter.log(f"backend: {result.backend_note}")
    if result.backend_detail:
        reporter.log(f"backend: {backend_line(result.backend, result.backend_detail)}")
    reporter.check_cancelled()  # after the last tile: still nothing written
    write_image_atomic(result.label, output)
    rows = node_report(result.label, image, min_volume_mm3=float(params.get("min_volume_mm3", 0.0)))
    summary = {"output": str(output), "model": result.model, "device": result.device,
               "backend": result.backend, "backend_detail": result.backend_detail,
               "seconds": round(result.seconds, 2), "nodes": len(rows), "warnings": result.warnings}
    if nodes_csv is not None:
        write_node_csv(rows, nodes_csv)
        summary["nodes_csv"] = str(nodes_csv)
    return summary


def _check_csv_path(raw: str | None) -> Path | None:
    if not raw:
        return None
    path = Path(raw).expanduser()
    if path.suffix.lower() != ".csv":
        raise UserInputError(f"node report {path}: use a .csv file name")
    if not path.parent.is_dir():
        raise UserInputError(f"node report folder does not exist: {path.parent}")
    return path
