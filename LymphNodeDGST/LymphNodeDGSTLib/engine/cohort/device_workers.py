"""`--devices cuda:0,cuda:1,...`: one batch worker process per device, each on its own share.

Worker i of n takes cases i, i+n, i+2n, ... of the (sorted) list, as nnU-Net's own multi-GPU
prediction splits a folder into parts; each worker runs `batch.segment_cases` (model loaded once,
read-ahead) and sends its rows back. Processes are spawned (CUDA cannot be forked). A worker that
dies leaves its unfinished cases as failed rows; the others finish.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
from typing import Sequence

from LymphNodeDGSTLib.engine.cohort.batch import BatchSettings, RowCallback, segment_cases
from LymphNodeDGSTLib.engine.cohort.table import CohortRow
from LymphNodeDGSTLib.engine.cohort.inputs import CohortCase
from LymphNodeDGSTLib.errors import UserInputError


def parse_devices(spec: str | None, default: str = "auto") -> list[str]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1'], each checked now (an absent GPU is exit 2)."""
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device

    names = [d.strip() for d in (spec or default).split(",")]
    if not all(names):
        raise UserInputError(f"--devices '{spec}': an empty device name; write e.g. cuda:0,cuda:1")
    for name in names:
        device = choose_device(name)
        if device.type == "cuda" and device.index is not None:
            import torch
            if device.index >= torch.cuda.device_count():
                raise UserInputError(f"device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return names


def segment_on_devices(cases: Sequence[CohortCase], output_dir, settings: BatchSettings,
                       devices: Sequence[str], on_row: RowCallback | None = None,
                       cancel_event=None) -> list[CohortRow]:
    """Rows of all cases; one worker process per device (in this process for a single device)."""
    devices = list(devices)[:max(1, len(cases))]
    if len(devices) == 1:
        return segment_cases(cases, output_dir, settings, devices[0], on_row, cancel_event)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    stop = context.Event()
    shares = [list(cases[i::len(devices)]) for i in range(len(devices))]
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    workers = [context.Process(target=_worker, name=f"lndgst-batch-{index}", daemon=True,
                               args=(index, share, str(output_dir), settings, device, results, stop,
                                     threads))
               for index, (device, share) in enumerate(zip(devices, shares))]
    for worker in workers:
        worker.start()
    rows: dict[str, CohortRow] = {}
    running = set(range(len(workers)))
    errors: dict[int, str] = {}
    try:
        while running:
            if cancel_event is not None and cancel_event.is_set():
                stop.set()
            try:
                message = results.get(timeout=0.5)
            except queue_module.Empty:
                for index in list(running):
                    if not workers[index].is_alive():
                        running.discard(index)  # died without saying "done"
                continue
            if message[0] == "row":
                rows[message[1].case] = message[1]
                if on_row is not None:
                    on_row(message[1])
            elif message[0] in ("done", "error"):
                running.discard(message[1])
                if message[0] == "error":
                    errors[message[1]] = message[2]
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
    for index, worker in enumerate(workers):
        for case in shares[index]:
            if case.name not in rows:
                row = _lost(case, devices[index],
                            errors.get(index, f"worker exit code {worker.exitcode}"))
                rows[case.name] = row
                if on_row is not None:
                    on_row(row)
    if cancel_event is not None and cancel_event.is_set():
        from LymphNodeDGSTLib.errors import Cancelled
        raise Cancelled("batch segmentation cancelled")
    return [rows[case.name] for case in cases]


def _lost(case: CohortCase, device: str, why: str) -> CohortRow:
    return CohortRow(case=case.name, status="failed", input=str(case.path),
                     message=f"not segmented: the worker on {device} stopped ({why})")


def _worker(index: int, cases, output_dir: str, settings: BatchSettings, device: str, results,
            stop, threads: int) -> None:
    """One device's worker process (spawned): its share of the cases, rows sent back."""
    import torch

    try:
        torch.set_num_threads(threads)
        segment_cases(cases, output_dir, settings, device,
                      on_row=lambda row: results.put(("row", row)), cancel_event=stop)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which fails the rest
        results.put(("error", index, f"{type(error).__name__}: {error}"))
        return
    results.put(("done", index))
