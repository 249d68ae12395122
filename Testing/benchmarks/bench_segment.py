"""Segmentation speed and memory: `lndgst segment` against stock nnUNetPredictor, side by side.

On the shared head-and-neck CT (511x511x90), for a tiny model and the default 30 M-parameter
3d_fullres architecture (random weights: timing only), with and without mirroring, each run in a
fresh process (peak RSS of that process), in one sitting so the ratios are comparable:
    stock      nnUNetPredictor.predict_single_npy_array on the whole image
    ours       Segmenter without the body crop (must never be slower than stock)
    ours+crop  Segmenter with the body crop (target: >= 1.5x faster than stock)
    ours+crop/BACKEND  the same with a CPU inference backend (--backends openvino,...; the model is
               converted into the store's cache before timing, the conversion is reported apart;
               `auto` is converted and guarded as its first run would (backend_guard.py, on the
               phantoms and the case library), then timed as a user gets it; `openvino-int8` is
               quantised on the reference cases' calibration set)
Each variant runs --repeat times (fresh processes, round robin: repeat r of every variant runs
before repeat r+1 of any, so a drifting load touches every variant alike); the median is reported.
--ct picks another CT (the head CT, say); --variants drops some of the built-in ones.
Every run is cut into phases, reported per run and as medians: the whole process (start to exit,
interpreter included), import, CT read, model load, backend compile, preprocessing (body box and
nnU-Net's preprocessing), network (the sliding-window tiles), resampling, writing the label.
Stock has no progress callback: its network, preprocessing and resampling are one phase.

    python Testing/benchmarks/bench_segment.py [--models tiny,default] [--modes fast,accurate]
        [--backends auto,openvino,openvino-bf16,openvino-int8,onnxruntime,torch-bf16] [--repeat 3]
        [--ct PATH] [--variants stock,ours,ours+crop]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CT = Path(os.environ.get("LNDGST_SHARED_DATA", REPO.parent / "shared" / "data")) / "ct" / "hn_ct_pycerr.nii.gz"
# "dice_vs_stock" is over the whole image: the crop variant writes 0 outside the body by design.

CHILD = r"""
import time
begun = time.perf_counter()
import json, resource, sys
import numpy as np, SimpleITK as sitk
variant, folder, ct, fast, device = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[6]
phases, marks = {}, {}
def mark(name):
    marks[name] = time.perf_counter()
def progress(stage, done, total):  # phase ends from the segmenter's progress stages
    if done == total:
        mark(stage)
if variant == "stock":
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
else:
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.engine.store.models import ModelStore
    import torch
    import nnunetv2.inference.predict_from_raw_data  # else imported in the model load (about 4 s)
phases["import"] = time.perf_counter() - begun
mark("start")
image = sitk.ReadImage(ct)
mark("read")
phases["read"] = marks["read"] - marks["start"]
started = time.perf_counter()
used, detail = "stock", None
if variant == "stock":
    predictor = nnUNetPredictor(device=torch.device(device), use_mirroring=not fast, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, use_folds=(0,))
    mark("load")
    array = sitk.GetArrayFromImage(image)[None].astype(np.float32)
    label = predictor.predict_single_npy_array(array, {"spacing": list(image.GetSpacing())[::-1]})
    mark("resample")
    phases["load"] = marks["load"] - started
    phases["preprocess+network+resample"] = marks["resample"] - marks["load"]
    output = sitk.GetImageFromArray(label.astype(np.uint8))
    output.CopyInformation(image)
else:
    backend = variant.split("/")[1] if "/" in variant else "torch"
    segmenter = Segmenter(ModelStore(folder), device=device, backend=backend)
    result = segmenter.segment(image, fast=fast, crop_body=variant.startswith("ours+crop"),
                               progress=progress)
    used, detail = result.backend, result.backend_detail
    assert backend == "auto" or result.backend == backend, result.backend_note
    output = result.label
    phases["load"] = marks["load"] - started
    loaded = marks.get("compile", marks["load"])
    phases["compile"] = loaded - marks["load"]
    phases["preprocess"] = marks["preprocess"] - loaded
    phases["network"] = marks.get("predict", marks["preprocess"]) - marks["preprocess"]
    phases["resample"] = marks["resample"] - marks.get("predict", marks["preprocess"])
seconds = time.perf_counter() - started
mark("write")
sitk.WriteImage(output, sys.argv[5].replace(".npy", ".nii.gz"))
phases["write"] = time.perf_counter() - marks["write"]
np.save(sys.argv[5], sitk.GetArrayFromImage(output).astype(np.uint8))
gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
def peak_rss_mb():  # VmHWM is this process image's own peak; ru_maxrss keeps the parent's across exec
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) / 1024 for l in status if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                  "peak_gpu_mb": gpu, "phases": {k: round(v, 2) for k, v in phases.items()},
                  "backend": used, "backend_detail": detail}))
"""
PHASES = ("process", "import", "read", "load", "compile", "preprocess", "network", "resample",
          "preprocess+network+resample", "write")


def prepare_models(work: Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """name -> (results folder for stock, store root for ours)."""
    from LymphNodeDGSTLib.engine.store.architectures import create_random_model, default_foundation_spec, tiny_spec
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    specs = {"tiny": tiny_spec(), "default": default_foundation_spec()}
    prepared = {}
    for name in names:
        if name == "demo":  # the trained, bundled demo model: what a user's labels look like
            import zipfile

            from LymphNodeDGSTLib.demo.demo_archive import locate_demo_model
            with zipfile.ZipFile(locate_demo_model()) as archive:
                archive.extractall(work / name)
            folder = next(p.parent for p in (work / name).rglob("plans.json"))
        else:
            folder = create_random_model(work / name, specs[name], seed=0)
        store_root = work / f"{name}-store"
        ModelStore(store_root).install(folder, name=name, show_progress=False)
        prepared[name] = (folder, store_root)
    return prepared


def write_slab(ct: Path, slices: int, out: Path) -> Path:
    """The `slices` middle axial slices of `ct`, geometry kept."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ct))
    depth = image.GetSize()[2]
    start = max(0, (depth - slices) // 2)
    sitk.WriteImage(image[:, :, start:start + min(slices, depth)], str(out))
    return out


def tile_count(folder: Path, ct: Path) -> int:
    """How many sliding-window tiles nnU-Net's predictor runs on `ct` (no mirroring)."""
    import json as json_module

    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    plans = json_module.loads((folder / "plans.json").read_text())
    configuration = plans["configurations"]["3d_fullres"]
    image = sitk.ReadImage(str(ct))
    spacing = np.array(image.GetSpacing()[::-1], dtype=float)
    target = np.array(configuration["spacing"], dtype=float)
    shape = np.round(np.array(image.GetSize()[::-1]) * spacing / target).astype(int)
    patch = configuration["patch_size"]
    shape = np.maximum(shape, patch)
    steps = compute_steps_for_sliding_window(tuple(shape), patch, 0.5)
    return int(np.prod([len(s) for s in steps]))


def convert_for(store_root: Path, name: str, backend: str) -> float:
    """Convert the installed model for `backend` into its version's cache (`auto`: convert and
    guard, as its first run does in the background); seconds taken."""
    import time

    from LymphNodeDGSTLib.engine.segmentation.backends.prepare import prepare
    from LymphNodeDGSTLib.engine.store.models import ModelStore

    if backend.startswith("torch"):
        return 0.0
    version = ModelStore(store_root).resolve(name)
    started = time.perf_counter()
    if backend == "auto":
        from LymphNodeDGSTLib.engine.segmentation.backend_guard import convert_and_guard
        convert_and_guard(version.path, "openvino")
    elif backend == "openvino-int8":
        from LymphNodeDGSTLib.engine.segmentation.backend_guard import quantize_version
        from LymphNodeDGSTLib.engine.segmentation.backends.reference import CALIBRATION, reference_cases
        quantize_version(version, reference_cases(version.path, CALIBRATION))
    else:
        prepare(version.path, backend)
    return time.perf_counter() - started


def run_child(variant: str, folder: Path, fast: bool, out: Path, device: str, ct: Path) -> dict:
    import time

    env = dict(os.environ, nnUNet_def_n_proc=str(os.cpu_count() or 2), nnUNet_n_proc_DA="0")
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", CHILD, variant, str(folder), str(ct),
                                "1" if fast else "0", str(out), device], capture_output=True, text=True,
                               env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{completed.stderr[-2000:]}")
    run = json.loads(completed.stdout.strip().splitlines()[-1])
    run["phases"] = {"process": round(time.perf_counter() - started, 2), **run["phases"]}
    return run


def median_phases(runs: list[dict]) -> dict[str, float]:
    import numpy as np

    names = [p for p in PHASES if p in runs[0]["phases"]]
    return {p: round(float(np.median([r["phases"][p] for r in runs])), 2) for p in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,default")
    parser.add_argument("--modes", default="fast,accurate")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backends", default="", help="CPU backends to add as ours+crop/BACKEND")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--ct", type=Path, default=CT, help="the CT to segment (default: the neck CT)")
    parser.add_argument("--slab", type=int, metavar="N", help="segment only the N middle axial slices "
                        "of the CT (a long CT with a large network); the tile counts of the slab and of "
                        "the whole CT are reported, to scale the network phase by")
    parser.add_argument("--variants", default="stock,ours,ours+crop",
                        help="built-in variants to run (stock is always run: it is the reference)")
    args = parser.parse_args()
    if not args.ct.exists():
        print(f"skipped: {args.ct} not found (shared data absent)")
        return 0
    import numpy as np

    from LymphNodeDGSTLib.adaptation.metrics import dice

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as scratch:
        work = Path(scratch)
        models = prepare_models(work, args.models.split(","))
        whole_ct = args.ct
        if args.slab:
            args.ct = write_slab(args.ct, args.slab, work / "slab.nii.gz")
            for name, (folder, _) in models.items():
                print(f"tiles ({name}, stock's sliding window): slab {tile_count(folder, args.ct)}, "
                      f"whole CT {tile_count(folder, whole_ct)}", flush=True)
        backends = [b for b in args.backends.split(",") if b]
        built_in = [v for v in ("stock", "ours", "ours+crop") if v == "stock" or v in args.variants.split(",")]
        variants = built_in + [f"ours+crop/{b}" for b in backends]
        print(f"CT: {args.ct}; load average: {os.getloadavg()}", flush=True)
        for name, (folder, store_root) in models.items():
            conversion = {b: round(convert_for(store_root, name, b), 1) for b in backends}
            for mode in args.modes.split(","):
                fast = mode == "fast"
                runs_of: dict[str, list[dict]] = {variant: [] for variant in variants}
                for repeat in range(args.repeat):
                    for variant in variants:
                        target = folder if variant == "stock" else store_root
                        out = work / f"{variant.replace('/', '-')}.npy"
                        run = run_child(variant, target, fast, out, args.device, args.ct)
                        runs_of[variant].append(run)
                        print(f"  {name} {mode} {variant} run {repeat + 1}: {run['seconds']:.1f} s, "
                              f"load average {os.getloadavg()[0]:.2f}; phases (s) {run['phases']}"
                              + (f"; {run['backend']}, {run['backend_detail']}" if run["backend_detail"]
                                 else ""), flush=True)
                results = {}
                for variant in variants:
                    runs = runs_of[variant]
                    out = work / f"{variant.replace('/', '-')}.npy"
                    results[variant] = {"seconds": float(np.median([r["seconds"] for r in runs])),
                                        "all_seconds": [round(r["seconds"], 1) for r in runs],
                                        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                                        "peak_gpu_mb": runs[0]["peak_gpu_mb"], "label": np.load(out),
                                        "phases": median_phases(runs), "backend": runs[-1]["backend"],
                                        "backend_detail": runs[-1]["backend_detail"]}
                stock = results["stock"]
                for variant in variants:
                    r = results[variant]
                    rows.append({
                        "model": name, "mode": mode, "variant": variant,
                        "device": args.device, "seconds": round(r["seconds"], 1),
                        "runs_s": r["all_seconds"],
                        "conversion_s": conversion.get(variant.partition("/")[2]),
                        "dice_vs_ours_torch": round(dice(r["label"], results["ours+crop"]["label"]), 4)
                        if variant.startswith("ours+crop") and "ours+crop" in results else None,
                        "peak_rss_mb": round(r["peak_rss_mb"]),
                        "peak_gpu_mb": None if r["peak_gpu_mb"] is None else round(r["peak_gpu_mb"]),
                        "speedup_vs_stock": round(stock["seconds"] / r["seconds"], 2),
                        "process_speedup_vs_stock": round(stock["phases"]["process"] / r["phases"]["process"], 2),
                        "memory_vs_stock": round(r["peak_rss_mb"] / stock["peak_rss_mb"], 2),
                        "dice_vs_stock": round(dice(r["label"], stock["label"]), 4),
                        "identical_to_stock": bool(np.array_equal(r["label"], stock["label"])),
                        "backend": r["backend"], "backend_detail": r["backend_detail"],
                        "phases_s": r["phases"],
                    })
                    print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"load average: {os.getloadavg()}")
    header = ["model", "mode", "device", "variant", "seconds", "runs_s", "peak_rss_mb", "peak_gpu_mb",
              "speedup_vs_stock", "process_speedup_vs_stock", "memory_vs_stock", "dice_vs_stock", "dice_vs_ours_torch",
              "identical_to_stock", "conversion_s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    print()
    print("Phases (median seconds; process = the whole child process, interpreter start included):")
    phase_header = ["model", "mode", "variant", "backend"] + list(PHASES)
    print("| " + " | ".join(phase_header) + " |")
    print("|" + "---|" * len(phase_header))
    for row in rows:
        cells = [row["model"], row["mode"], row["variant"],
                 row["backend"] + (f" ({row['backend_detail']})" if row["backend_detail"] else "")]
        cells += [row["phases_s"].get(p, "-") for p in PHASES]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
