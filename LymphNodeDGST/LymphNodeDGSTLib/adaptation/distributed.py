"""`lndgst adapt --nproc N`: fine-tuning on N processes with torchrun and nnU-Net's DDP path.

`launch_fine_tune` (in the adaptation job) writes a spec, starts
`python -m torch.distributed.run --standalone --nproc-per-node N -m
LymphNodeDGSTLib.adaptation.distributed SPEC`, relays rank 0's progress, and returns rank 0's
`FineTuneResult`. Each rank (`worker_main`) joins the process group (NCCL when every rank has its
own GPU, else gloo: CPU runs, or more ranks than GPUs) and runs the same `fine_tune` with the DDP
trainer subclass (`ddp_trainer`). A cancel ends the whole process group; nothing is published.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable

from LymphNodeDGSTLib.errors import Cancelled, UserInputError

EVENT_PREFIX = "LNDGST-DDP "
SPEC_FILE = "ddp_spec.json"
RESULT_FILE = "ddp_result.json"
MAX_NPROC = 64


def check_nproc(nproc: int, device: str) -> None:
    """Refuse what cannot run: fewer than 1 process; DDP on Apple GPUs."""
    if nproc < 1 or nproc > MAX_NPROC:
        raise UserInputError(f"--nproc must be between 1 and {MAX_NPROC}")
    if nproc > 1 and device.startswith("mps"):
        raise UserInputError("--nproc > 1 needs CUDA GPUs or the CPU (DDP does not run on mps)")


def torchrun_command(spec_path: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={nproc}", "-m", "LymphNodeDGSTLib.adaptation.distributed",
            str(spec_path)]


def launch_fine_tune(foundation_path: Path, trust_checkpoint: bool, dataset, work_dir: Path,
                     settings, device: str, nproc: int,
                     on_iteration: Callable | None = None, on_epoch: Callable | None = None,
                     should_stop: Callable[[], bool] | None = None, audit_path: Path | None = None):
    """Run `fine_tune` on `nproc` DDP ranks; rank 0's FineTuneResult."""
    from LymphNodeDGSTLib.adaptation.trainer import FineTuneResult

    work_dir.mkdir(parents=True, exist_ok=True)
    spec = {"foundation": str(foundation_path), "trust_checkpoint": bool(trust_checkpoint),
            "dataset": {**asdict(dataset), "preprocessed_root": str(dataset.preprocessed_root)},
            "work_dir": str(work_dir), "settings": asdict(settings), "device": device,
            "threads": max(1, (os.cpu_count() or 1) // nproc),
            "audit_path": str(audit_path) if audit_path else None}
    spec_path = work_dir / SPEC_FILE
    spec_path.write_text(json.dumps(spec))
    (work_dir / RESULT_FILE).unlink(missing_ok=True)
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    process = subprocess.Popen(torchrun_command(spec_path, nproc), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)],
                              daemon=True)
    reader.start()
    tail: list[str] = []
    while True:
        if should_stop is not None and should_stop():
            _stop(process)
            raise Cancelled("adaptation cancelled")
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            break
        if line.startswith(EVENT_PREFIX):
            event = json.loads(line[len(EVENT_PREFIX):])
            if event["kind"] == "iteration" and on_iteration is not None:
                on_iteration(event["done"], event["total"], event["loss"])
            elif event["kind"] == "epoch" and on_epoch is not None:
                on_epoch(event["epoch"], event["record"])
        else:
            tail = (tail + [line.rstrip()])[-40:]
    if process.wait() != 0 or not (work_dir / RESULT_FILE).is_file():
        raise RuntimeError(f"torchrun with {nproc} processes failed (exit {process.returncode}):\n"
                           + "\n".join(tail))
    saved = json.loads((work_dir / RESULT_FILE).read_text())
    saved["results_folder"] = Path(saved["results_folder"])
    return FineTuneResult(**{f.name: saved[f.name] for f in fields(FineTuneResult)})


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _emit(kind: str, **payload) -> None:
    print(EVENT_PREFIX + json.dumps({"kind": kind, **payload}), flush=True)


def worker_main(spec_path: str) -> int:
    """One DDP rank (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    import torch
    import torch.distributed as dist

    from LymphNodeDGSTLib.adaptation.ddp_trainer import distributed_trainer_class
    from LymphNodeDGSTLib.adaptation.nnunet_dataset import PreparedDataset
    from LymphNodeDGSTLib.adaptation.trainer import FineTuneSettings, fine_tune
    from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint

    spec = json.loads(Path(spec_path).read_text())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if spec["device"].startswith("cuda"):
        gpus = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % gpus)
        torch.cuda.set_device(device)
        backend = "nccl" if world <= gpus else "gloo"
    else:
        device, backend = torch.device("cpu"), "gloo"
    torch.set_num_threads(spec["threads"])
    dist.init_process_group(backend)
    try:
        rank = dist.get_rank()
        dataset_spec = dict(spec["dataset"])
        dataset_spec["preprocessed_root"] = Path(dataset_spec["preprocessed_root"])
        dataset = PreparedDataset(**dataset_spec)
        foundation = load_checkpoint(spec["foundation"], trust=spec["trust_checkpoint"])
        settings = FineTuneSettings(**spec["settings"])
        main = rank == 0
        result = fine_tune(
            foundation, dataset, Path(spec["work_dir"]), settings, device,
            on_iteration=(lambda d, t, loss: _emit("iteration", done=d, total=t, loss=loss)) if main else None,
            on_epoch=(lambda e, record: _emit("epoch", epoch=e, record=record)) if main else None,
            trainer_class=distributed_trainer_class(spec.get("audit_path")))
        if main:
            saved = asdict(result)
            saved["results_folder"] = str(result.results_folder)
            saved["device"] = f"{result.device} x{world} ({backend})"
            tmp = Path(spec["work_dir"]) / (RESULT_FILE + ".tmp")
            tmp.write_text(json.dumps(saved))
            os.replace(tmp, Path(spec["work_dir"]) / RESULT_FILE)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
