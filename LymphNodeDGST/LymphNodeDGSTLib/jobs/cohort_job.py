"""The `segment_folder` job kind: a cohort folder segmented in a worker process (Slicer's
"Segment all CTs in a folder"), with the options of `lndgst segment INPUT_DIR OUTPUT_DIR`.

Parameters (JSON): input_dir, output_dir, and optionally model, device ("auto"), devices
("cuda:0,cuda:1"), part ("K/N"), fast (false), crop_body (true), min_volume_mm3 (0), home,
trust_checkpoint (false). Progress is one step per case (stage "cases") with the ETA from the
segmented cases' pace; a cancel stops before the next sliding-window tile, and every case already
finished stays written (a rerun resumes). The result counts the cases and names the cohort CSV.
"""

from __future__ import annotations

import threading

from LymphNodeDGSTLib.engine.cohort.batch import BatchSettings
from LymphNodeDGSTLib.engine.cohort.device_workers import parse_devices
from LymphNodeDGSTLib.engine.cohort.run import plan_cohort, run_cohort
from LymphNodeDGSTLib.engine.store.models import ModelStore
from LymphNodeDGSTLib.engine.cohort.parts import parse_part
from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import resolve_home
from LymphNodeDGSTLib.jobs.events import Reporter

STAGE = "cases"


def check_params(params: dict):
    """Everything checked before work: (plan, settings, devices); bad input raises UserInputError."""
    if not params.get("input_dir") or not params.get("output_dir"):
        raise UserInputError("a folder segmentation needs 'input_dir' and 'output_dir'")
    home = resolve_home(params.get("home"))
    part = parse_part(params.get("part"))
    devices = parse_devices(params.get("devices"), default=params.get("device", "auto"))
    plan = plan_cohort(params["input_dir"], params["output_dir"], part)
    version = ModelStore(home.models).resolve(params.get("model"))
    settings = BatchSettings(str(home.models), version.ref, fast=bool(params.get("fast")),
                             crop_body=bool(params.get("crop_body", True)),
                             min_volume_mm3=float(params.get("min_volume_mm3", 0.0)),
                             trust_checkpoint=bool(params.get("trust_checkpoint", False)))
    return plan, settings, devices


def run(params: dict, reporter: Reporter) -> dict:
    plan, settings, devices = check_params(params)
    reporter.log(f"segmenting {len(plan.cases)} case(s) of {plan.input_dir} with {settings.model} "
                 f"on {','.join(devices)}")
    reporter.progress(0, len(plan.cases), stage=STAGE)
    cancel = threading.Event()
    watching = threading.Event()

    def watch() -> None:  # a cancel must reach a case in the middle of its sliding window
        while True:
            if reporter.cancelled():
                cancel.set()
                return
            if watching.wait(0.5):
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def on_row(row, eta) -> None:
        reporter.progress(eta.done, eta.total, stage=STAGE, eta_s=eta.seconds_left(), case=row.case,
                          status=row.status)
        if row.status == "failed":
            reporter.log(f"failed: {row.input}: {row.message}")

    try:
        rows = run_cohort(plan, settings, devices, on_row=on_row, cancel_event=cancel)
    finally:
        watching.set()
    reporter.check_cancelled()
    counts = {status: sum(r.status == status for r in rows) for status in ("segmented", "resumed", "failed")}
    return {"cohort_csv": str(plan.csv_path), "output_dir": str(plan.output_dir), "cases": len(rows),
            **counts, "failures": [{"input": r.input, "message": r.message}
                                   for r in rows if r.status == "failed"]}
