"""Batch segmentation of a cohort on one device: model loaded once, next case prepared meanwhile.

A reader thread reads, hashes and preprocesses case i+1 (nnU-Net's own preprocessing) while the
network runs on case i; the queue between them holds one case, so memory stays at about two
cases. Per case it writes, each atomically, `NAME.nii.gz` (label on the CT's grid),
`NAME.nodes.csv` (node report) and last `.lndgst-batch/NAME.json` (what was done, with which
model, on which voxels). A case is skipped (resumed) only when that record matches the decoded
image's hash, the model version and its checkpoint hashes, and the settings, and both outputs
exist: renaming a file does not redo it, changing its voxels or the model does.

A bad case (unreadable, 2D, no DICOM series, ...) becomes a `failed` row and the batch goes on.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from LymphNodeDGSTLib.atomic import write_json_atomic
from LymphNodeDGSTLib.engine.cohort.table import CohortRow
from LymphNodeDGSTLib.engine.cohort.inputs import CohortCase, image_sha256
from LymphNodeDGSTLib.errors import Cancelled, OutOfMemory, UserInputError

RECORD_FOLDER = ".lndgst-batch"
LABEL_SUFFIX = ".nii.gz"
NODES_SUFFIX = ".nodes.csv"

RowCallback = Callable[[CohortRow], None]


@dataclass(frozen=True)
class BatchSettings:
    """What a batch segments with; everything but `models_root` and `trust_checkpoint` is part
    of the resume key."""

    models_root: str
    model: str | None = None
    fast: bool = False
    crop_body: bool = True
    min_volume_mm3: float = 0.0
    trust_checkpoint: bool = False

    def key(self) -> dict:
        return {"fast": self.fast, "crop_body": self.crop_body, "min_volume_mm3": self.min_volume_mm3}


def case_outputs(output_dir: Path, name: str) -> tuple[Path, Path, Path]:
    """(label, node CSV, record) of a case."""
    return (output_dir / f"{name}{LABEL_SUFFIX}", output_dir / f"{name}{NODES_SUFFIX}",
            output_dir / RECORD_FOLDER / f"{name}.json")


def model_key(version) -> str:
    """The model version and a hash of its checkpoints' hashes: a reinstalled NAME@1 differs."""
    hashes = json.dumps(version.metadata.get("checkpoint_sha256", {}), sort_keys=True)
    return f"{version.ref}#{hashlib.sha256(hashes.encode()).hexdigest()[:16]}"


def resumed_row(case: CohortCase, output_dir: Path, digest: str, key: str, settings: BatchSettings) -> CohortRow | None:
    """The finished row of an earlier run of exactly this case, model and settings, or None."""
    label, nodes, record_path = case_outputs(output_dir, case.name)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (record.get("image_sha256") != digest or record.get("model_key") != key
            or record.get("settings") != settings.key() or not label.is_file() or not nodes.is_file()):
        return None
    row = CohortRow(**record["row"])
    row.case, row.status, row.input = case.name, "resumed", str(case.path)
    return row


def segment_cases(cases: Sequence[CohortCase], output_dir: str | Path, settings: BatchSettings,
                  device: str = "auto", on_row: RowCallback | None = None,
                  cancel_event: threading.Event | None = None) -> list[CohortRow]:
    """Segment `cases` into `output_dir` on one device; one row per case, in order."""
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    output_dir = Path(output_dir)
    (output_dir / RECORD_FOLDER).mkdir(parents=True, exist_ok=True)
    store = ModelStore(settings.models_root)
    version = store.resolve(settings.model)
    key = model_key(version)
    segmenter = Segmenter(store, device=device, trust_checkpoint=settings.trust_checkpoint)
    cancel = cancel_event or threading.Event()   # the caller's request to stop
    stop = threading.Event()                     # ours: the reader must stop (cancel or error)
    handoff: queue.Queue = queue.Queue(maxsize=1)
    reader = threading.Thread(target=_read_ahead, name="lndgst-prefetch", daemon=True,
                              args=(cases, output_dir, settings, segmenter, version, key, handoff,
                                    stop, cancel))
    reader.start()
    rows: list[CohortRow] = []
    try:
        while True:
            item = handoff.get()
            if item is None:
                break
            if cancel.is_set():
                raise Cancelled("batch segmentation cancelled")
            row = item if isinstance(item, CohortRow) else _finish_case(
                segmenter, *item, output_dir=output_dir, settings=settings, key=key, cancel=cancel)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        stop.set()
        _drain(handoff)
        reader.join(timeout=60)
    return rows


def _read_ahead(cases, output_dir, settings, segmenter, version, key, handoff: queue.Queue,
                stop: threading.Event, cancel: threading.Event) -> None:
    """Reader thread: each case becomes a failed/resumed row or (case, digest, prepared)."""
    from LymphNodeDGSTLib.engine.images.files import read_image

    try:
        for case in cases:
            if stop.is_set() or cancel.is_set():
                return
            started = time.perf_counter()
            try:
                image = read_image(case.path, "input")
                digest = image_sha256(image)
                item = resumed_row(case, output_dir, digest, key, settings)
                if item is None:
                    prepared = segmenter.prepare(image, model=version, crop_body=settings.crop_body)
                    item = (case, digest, prepared)
            except UserInputError as error:
                item = _failed(case, str(error), version.ref, started)
            except Exception as error:  # noqa: BLE001 - one bad case must not stop the batch
                item = _failed(case, f"{type(error).__name__}: {error}", version.ref, started)
            if not _put(handoff, item, stop):
                return
    finally:
        _put(handoff, None, stop, force=True)


def _finish_case(segmenter, case: CohortCase, digest: str, prepared, *, output_dir: Path,
                 settings: BatchSettings, key: str, cancel: threading.Event) -> CohortRow:
    """Network, node report, and the three outputs (record last) of one prepared case."""
    from LymphNodeDGSTLib.engine.images.files import write_image_atomic
    from LymphNodeDGSTLib.engine.segmentation.nodes import node_report, write_node_csv

    started = time.perf_counter()
    try:
        result = segmenter.segment_prepared(prepared, fast=settings.fast, cancel_event=cancel)
        nodes = node_report(result.label, prepared.image, min_volume_mm3=settings.min_volume_mm3)
    except Cancelled:
        raise
    except (OutOfMemory, UserInputError) as error:
        return _failed(case, str(error), prepared.version.ref, started)
    except Exception as error:  # noqa: BLE001 - one case the network cannot take must not stop the batch
        return _failed(case, f"{type(error).__name__}: {error}", prepared.version.ref, started)
    label_path, nodes_path, record_path = case_outputs(output_dir, case.name)
    write_image_atomic(result.label, label_path)
    write_node_csv(nodes, nodes_path)
    row = CohortRow(
        case=case.name, status="segmented", nodes=len(nodes),
        total_volume_mm3=round(sum(n.volume_mm3 for n in nodes), 2),
        largest_short_axis_mm=round(max(n.short_axis_mm for n in nodes), 2) if nodes else None,
        model_version=result.model, seconds=round(result.seconds, 2), input=str(case.path),
        image_sha256=digest, message="; ".join(result.warnings))
    write_json_atomic(record_path, {"image_sha256": digest, "model_key": key,
                                    "settings": settings.key(), "device": result.device,
                                    "row": asdict(row)})
    return row


def _failed(case: CohortCase, message: str, model: str, started: float) -> CohortRow:
    return CohortRow(case=case.name, status="failed", model_version=model,
                     seconds=round(time.perf_counter() - started, 2), input=str(case.path),
                     message=message.replace("\n", " "))


def _put(handoff: queue.Queue, item, stop: threading.Event, force: bool = False) -> bool:
    while True:
        if stop.is_set() and not force:
            return False
        try:
            handoff.put(item, timeout=0.2)
            return True
        except queue.Full:
            if force and stop.is_set():
                return False


def _drain(handoff: queue.Queue) -> None:
    while True:
        try:
            handoff.get_nowait()
        except queue.Empty:
            return
