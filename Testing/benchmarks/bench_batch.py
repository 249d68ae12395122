"""Cohort segmentation: one `lndgst segment INPUT_DIR OUTPUT_DIR` against one `lndgst segment`
per file, side by side, and `--part K/N` coverage (issue 18). Not a timed test.

Throughput: site-A phantoms and the bundled demo model on the CPU, `--fast`; the per-file loop
starts a fresh `lndgst` process per CT (how people script it today), the batch is one process
(model loaded once, next case preprocessed while the network runs). The two alternate
(per-file, batch, batch, per-file for --rounds 2) so a change of machine load hits both; the
labels of both must be identical. The load average is printed with the figures.

Coverage: `lndgst segment --part K/N` for K = 1..N as separate processes on --coverage-files
small CTs (tiny random model), then `lndgst cohort merge`: every case exactly once.

    python Testing/benchmarks/bench_batch.py [--cases 6] [--rounds 1] [--coverage-files 12] [--parts 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def lndgst(home: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "LymphNodeDGSTLib", "--home", str(home), *args]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def throughput(work: Path, cases: int, rounds: int) -> dict:
    from LymphNodeDGSTLib.demo.demo_model import ensure_default_model
    from LymphNodeDGSTLib.demo.phantom import write_phantoms
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    home = work / "home"
    model = ensure_default_model(ModelStore(home / "models"))
    staging, inputs = work / "phantoms", work / "cts"
    inputs.mkdir()
    for ct, _ in write_phantoms(staging, "A", cases, 100):
        os.replace(ct, inputs / ct.name)
    files = sorted(inputs.iterdir())
    timings: dict[str, list[float]] = {"per-file": [], "batch": []}
    order = ["per-file", "batch", "batch", "per-file"][:2 * rounds] if rounds > 1 else ["per-file", "batch"]
    loads = [load()]
    for index, variant in enumerate(order):
        out = work / f"{variant}-{index}"
        out.mkdir()
        started = time.perf_counter()
        if variant == "per-file":
            for path in files:
                name = path.name.replace(".nii.gz", "")
                done = lndgst(home, "segment", str(path), str(out / f"{name}.nii.gz"), "--fast",
                              "--device", "cpu", "--nodes", str(out / f"{name}.nodes.csv"))
                assert done.returncode == 0, done.stderr
        else:
            done = lndgst(home, "segment", str(inputs), str(out), "--fast", "--device", "cpu")
            assert done.returncode == 0, done.stderr
        timings[variant].append(time.perf_counter() - started)
        loads.append(load())
    first_per_file = work / f"per-file-{order.index('per-file')}"
    first_batch = work / f"batch-{order.index('batch')}"
    identical = all(np.array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(first_per_file / p.name))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(first_batch / p.name)))) for p in files)
    per_file, batch = np.mean(timings["per-file"]), np.mean(timings["batch"])
    return {"model": model, "cases": cases, "order": order, "per_file_s": timings["per-file"],
            "batch_s": timings["batch"], "speedup": round(per_file / batch, 2),
            "labels_identical": identical, "load_average_1_5_15": loads}


def coverage(work: Path, files: int, parts: int) -> dict:
    from LymphNodeDGSTLib.engine.store.architectures import create_random_model
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    home = work / "home-tiny"
    ModelStore(home / "models").install(create_random_model(work / "tiny"), name="tiny", show_progress=False)
    inputs, out = work / "small", work / "parts-out"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        array = np.where(rng.random((12, 48, 48)) > 0.5, 40, -1000).astype(np.int16)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.5, 1.5, 3.0))
        sitk.WriteImage(image, str(inputs / f"case{i:03d}.nrrd"))
    counts = []
    for k in range(1, parts + 1):
        done = lndgst(home, "segment", str(inputs), str(out), "--fast", "--device", "cpu",
                      "--part", f"{k}/{parts}")
        assert done.returncode == 0, done.stderr
        with open(out / f"cohort.part-{k}-of-{parts}.csv") as handle:
            counts.append(sum(1 for _ in csv.DictReader(handle)))
    merged = work / "merged.csv"
    done = lndgst(home, "cohort", "merge", str(out), "-o", str(merged))
    assert done.returncode == 0, done.stderr
    with open(merged) as handle:
        cases = [row["case"] for row in csv.DictReader(handle)]
    expected = sorted(p.name.replace(".nrrd", "") for p in inputs.iterdir())
    return {"files": files, "parts": parts, "cases_per_part": counts,
            "every_case_exactly_once": sorted(cases) == expected and len(set(cases)) == len(cases),
            "labels_written": len(list(out.glob("*.nii.gz")))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1, choices=(1, 2))
    parser.add_argument("--coverage-files", type=int, default=12)
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        work = Path(folder)
        report = {"cpu_count": os.cpu_count()}
        if not args.skip_throughput:
            report["throughput"] = throughput(work, args.cases, args.rounds)
        report["coverage"] = coverage(work, args.coverage_files, args.parts)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
