"""Accuracy guard for the inference backends: Dice of each backend's labels against torch fp32.

The bundled demo model segments site-A and site-B phantoms (demo/phantom/) and, with
`--ct`, shared real CTs, once per backend through the whole segmenter (tiling, body crop,
resampling). Dice is computed against the torch fp32 labels (and, for phantoms, the truth), per
case and pooled over all cases' voxels (the figure `auto`'s guard judges by: backend_guard.py).
`openvino-int8` is quantised first, on the reference cases' calibration set (the phantoms).

    python Testing/benchmarks/bench_backend_dice.py [--backends openvino,onnxruntime] \
        [--phantoms-a 2 --phantoms-b 2] [--ct /work/shared/data/ct/hn_ct_pycerr.nii.gz] [--full]
    e.g. --backends openvino,openvino-int8,openvino-bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "LymphNodeDGST"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="openvino,onnxruntime,openvino-bf16")
    parser.add_argument("--phantoms-a", type=int, default=2)
    parser.add_argument("--phantoms-b", type=int, default=2)
    parser.add_argument("--ct", action="append", default=[], help="a real CT (repeatable)")
    parser.add_argument("--full", action="store_true", help="with mirroring (default: --fast)")
    args = parser.parse_args()

    import numpy as np
    import SimpleITK as sitk

    from LymphNodeDGSTLib.adaptation.metrics import dice
    from LymphNodeDGSTLib.demo.demo_model import locate_demo_model
    from LymphNodeDGSTLib.demo.phantom import generate_phantom
    from LymphNodeDGSTLib.engine.segmentation.backend_guard import pooled_dice
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        store = ModelStore(Path(scratch) / "models")
        store.install(locate_demo_model(), name="demo", show_progress=False)
        cases = []
        for site, count, first in (("A", args.phantoms_a, 6000), ("B", args.phantoms_b, 3000)):
            for seed in range(first, first + count):
                phantom = generate_phantom(site, seed)
                cases.append((f"site{site}-{seed}", phantom.image, phantom.label))
        for path in args.ct:
            cases.append((Path(path).name.split(".")[0], sitk.ReadImage(path), None))
        labels: dict[tuple[str, str], np.ndarray] = {}
        for backend in ["torch"] + args.backends.split(","):
            segmenter = Segmenter(store, device="cpu", backend=backend)
            for name, image, truth in cases:
                started = time.perf_counter()
                result = segmenter.segment(image, model="demo", fast=not args.full)
                seconds = time.perf_counter() - started
                label = sitk.GetArrayFromImage(result.label)
                labels[(backend, name)] = label
                reference = labels[("torch", name)]
                truth_dice = dice(label > 0, sitk.GetArrayFromImage(truth) > 0) if truth is not None else None
                print(f"{backend:14s} used={result.backend:14s} {name:28s} dice_vs_torch="
                      f"{dice(label > 0, reference > 0):.5f} differing_voxels={int((label != reference).sum())} "
                      f"dice_vs_truth={'-' if truth_dice is None else f'{truth_dice:.4f}'} "
                      f"seconds={seconds:.1f} note={result.backend_note}", flush=True)
        for backend in args.backends.split(","):
            names = [name for name, _, _ in cases]
            pooled, differing = pooled_dice([labels[("torch", n)] for n in names],
                                            [labels[(backend, n)] for n in names])
            print(f"{backend:14s} pooled dice_vs_torch={pooled:.5f} over {len(names)} cases, "
                  f"differing_voxels={differing}", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
