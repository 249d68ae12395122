"""One patch forward per CPU inference backend, side by side (engine/segmentation/backends/networks.py).

Each (model, backend) runs in a fresh process: build the network (seeded random weights for the
30.4 M default architecture, the bundled weights for the demo model), convert it (timed), one
warm-up forward, then `--repeat` timed forwards (best reported). Agreement with torch fp32 on the
same input: share of voxels with the same argmax, and the largest absolute logit difference.

    python Testing/benchmarks/bench_backend_forward.py [--models demo,default] [--backends ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "LymphNodeDGST"))

BACKENDS = ("torch", "torch-bf16", "openvino", "openvino-bf16", "onnxruntime")


def build(model: str, scratch: Path):
    """(network, input shape) for 'demo' (bundled weights) or 'default' (30.4 M, random)."""
    import torch

    from LymphNodeDGSTLib.engine.store.architectures import (build_network, default_foundation_spec,
                                                       make_dataset_json, make_plans, read_json)
    if model == "default":
        spec = default_foundation_spec()
        plans, dataset_json = make_plans(spec), make_dataset_json(spec.labels)
        torch.manual_seed(0)
        network = build_network(plans, dataset_json)
        patch = spec.patch_size
    else:
        with zipfile.ZipFile(REPO / "LymphNodeDGST/Resources/DemoModel/lymphnode-demo.zip") as z:
            z.extractall(scratch)
        folder = next(scratch.rglob("plans.json")).parent
        plans, dataset_json = read_json(folder / "plans.json"), read_json(folder / "dataset.json")
        network = build_network(plans, dataset_json)
        checkpoint = torch.load(next(folder.rglob("checkpoint_final.pth")), weights_only=False)
        network.load_state_dict(checkpoint["network_weights"])
        patch = plans["configurations"]["3d_fullres"]["patch_size"]
    return network.eval(), (1, 1, *patch)


def child(model: str, backend: str, repeat: int, out: Path) -> None:
    import numpy as np
    import torch

    from LymphNodeDGSTLib.engine.segmentation.backends.networks import (FORMAT_OF, TorchBf16Runner, convert, inference_threads,
                                                  load_runner)
    torch.set_num_threads(inference_threads())
    with tempfile.TemporaryDirectory() as scratch:
        network, shape = build(model, Path(scratch))
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=generator)
        started = time.perf_counter()
        if backend == "torch":
            runner = network
        elif backend == "torch-bf16":
            runner = TorchBf16Runner(network)
        else:
            folder = Path(scratch) / "converted"
            folder.mkdir()
            convert(FORMAT_OF[backend], network, torch.zeros(shape), folder)
            runner = load_runner(backend, folder)
        convert_s = time.perf_counter() - started
        times = []
        with torch.inference_mode():
            y = runner(x)  # warm-up
            for _ in range(repeat):
                started = time.perf_counter()
                y = runner(x)
                times.append(time.perf_counter() - started)
        np.save(out / f"{model}-{backend}.npy", y.float().numpy())
        print(json.dumps({"model": model, "backend": backend, "convert_s": round(convert_s, 2),
                          "times": [round(t, 3) for t in times], "threads": inference_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="demo,default")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.repeat, Path(args.out))
        return
    import numpy as np
    print(f"load average: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as out:
        rows = []
        for model in args.models.split(","):
            for backend in args.backends.split(","):
                run = subprocess.run([sys.executable, str(HERE), "--child", model, backend,
                                      "--repeat", str(args.repeat), "--out", out],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    print(f"{model} {backend}: failed: {run.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                row = json.loads(run.stdout.strip().splitlines()[-1])
                reference = Path(out) / f"{model}-torch.npy"
                if reference.is_file():
                    a, b = np.load(reference), np.load(Path(out) / f"{model}-{backend}.npy")
                    row["argmax_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
                    row["max_abs_diff"] = float(np.abs(a - b).max())
                row["best_s"] = min(row["times"])
                rows.append(row)
                print(json.dumps(row), flush=True)
        print(f"load average: {os.getloadavg()}")
        print("| model | backend | best forward (s) | vs torch fp32 | argmax agreement | max abs logit diff | conversion (s) |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            base = next((r["best_s"] for r in rows if r["model"] == row["model"] and r["backend"] == "torch"), None)
            speed = f"{base / row['best_s']:.2f}x" if base else "-"
            print(f"| {row['model']} | {row['backend']} | {row['best_s']:.3f} | {speed} | "
                  f"{row.get('argmax_agreement', float('nan')) * 100:.3f} % | {row.get('max_abs_diff', float('nan')):.2e} | "
                  f"{row['convert_s']:.1f} |")


if __name__ == "__main__":
    main()
