"""`lndgst demo`: the whole loop on the bundled demo model and synthetic site-B phantoms.

1. A fresh home in the output folder; the demo model (trained on site-A phantoms) is installed.
2. Site-B phantoms are made: a "patient", a few corrected cases, and unseen test phantoms.
3. The patient is segmented with the site-A model.
4. The cases (their exact phantom truth plays the clinician's corrections) go into the library.
5. A background job adapts the model the way `lndgst adapt` does by default (the default method,
   the automatic schedule), with progress, and activates the new version if its gate passes.
6. The same segmenter (no restart) segments the patient again with the adapted version.
7. Overlays before/after, the job's figure, and the Dice on the unseen site-B phantoms.
The last line printed is exactly `dice_before=X dice_after=Y`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.home import Home
from LymphNodeDGSTLib.adaptation.metrics import image_dice

PATIENT_SEED = 100          # site-B phantom segmented before and after
CASE_SEEDS = range(200, 205)  # site-B phantoms added as corrected cases
TEST_SEEDS = range(300, 303)  # unseen site-B phantoms: the held-out Dice of the last line


def run_demo(home: Home, output: Path, device: str = "auto", iterations: int | None = None,
             cases: int = len(CASE_SEEDS), tests: int = len(TEST_SEEDS)) -> int:
    from LymphNodeDGSTLib.adaptation.adapt import AdaptRequest
    from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
    from LymphNodeDGSTLib.demo.demo_model import ensure_default_model, locate_demo_model
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device, describe_device
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.jobs.manager import JobManager
    from LymphNodeDGSTLib.jobs.follow import follow_job
    from LymphNodeDGSTLib.engine.store.models import ModelStore
    from LymphNodeDGSTLib.demo.phantom import generate_phantom

    started = time.perf_counter()
    if iterations is not None and iterations < 1:
        raise UserInputError("demo: --iterations must be at least 1")
    if locate_demo_model() is None:
        raise UserInputError("the demo model is missing (LymphNodeDGST/Resources/DemoModel/"
                             "lymphnode-demo.zip); re-create it with "
                             "'python -m LymphNodeDGSTLib.demo.demo_model --output ...'")
    chosen = choose_device(device)
    output = Path(output).resolve()
    demo_home = Home(output / "home")
    if demo_home.root.exists():
        shutil.rmtree(demo_home.root)
    (output / "phantoms").mkdir(parents=True, exist_ok=True)
    _say(f"demo folder: {output} (its own fresh home: {demo_home.root}); device: {describe_device(chosen)}")

    store = ModelStore(demo_home.models)
    model = ensure_default_model(store)
    _say(f"1/6 installed the demo model {model} (trained on site-A phantoms; not a clinical model)")

    patient = generate_phantom("B", PATIENT_SEED)
    patient_ct = output / "phantoms" / "patient_siteB_ct.nii.gz"
    sitk.WriteImage(patient.image, str(patient_ct))
    sitk.WriteImage(patient.label, str(output / "phantoms" / "patient_siteB_truth.nii.gz"))
    segmenter = Segmenter(store, device=str(chosen))
    before = segmenter.segment(patient.image, fast=True).label
    sitk.WriteImage(before, str(output / "patient_label_before.nii.gz"))
    _say(f"2/6 segmented a site-B patient phantom with {segmenter.loaded_version.ref}: "
         f"Dice {image_dice(before, patient.label):.3f}")

    library = CaseLibrary(demo_home.cases)
    for seed in list(CASE_SEEDS)[:cases]:
        phantom = generate_phantom("B", seed)
        library.add(phantom.image, phantom.label)
    _say(f"3/6 added {len(library)} corrected site-B cases to the case library")

    # the product's default path (method and automatic schedule); --iterations: a fixed schedule
    request = (AdaptRequest(model=model, device=str(chosen)) if iterations is None else
               AdaptRequest(model=model, iterations=iterations,
                            iterations_per_epoch=max(1, iterations // 5), device=str(chosen)))
    jobs = JobManager(demo_home.jobs)
    job = jobs.submit("adapt", {"home": str(demo_home.root), "request": asdict(request)},
                      device=str(chosen), exclusive_device=True)
    schedule = "the automatic schedule" if iterations is None else f"{iterations} iterations"
    _say(f"4/6 adapting with {request.method} ({schedule}) in background job {job.id}")
    if follow_job(jobs, job.id) != 0:
        info = jobs.get(job.id)
        raise RuntimeError(f"the adaptation job failed: {info.error}")
    result = jobs.get(job.id).result
    _say(f"    {result['schedule_text']}")
    _say(f"    {result['version']} published; activated: {result['activated']}")

    after = segmenter.segment(patient.image, fast=True).label
    sitk.WriteImage(after, str(output / "patient_label_after.nii.gz"))
    _say(f"5/6 segmented the patient again with {segmenter.loaded_version.ref} (hot swap, no "
         f"restart): Dice {image_dice(after, patient.label):.3f}")
    write_overlay(patient.image, patient.label, before, output / "overlay_before.png", "before adaptation")
    write_overlay(patient.image, patient.label, after, output / "overlay_after.png", "after adaptation")
    shutil.copy2(result["figure"], output / "adaptation_report.png")

    parent = store.resolve(result["parent"])
    adapted = store.resolve(result["version"])
    scores = {"before": [], "after": []}
    for seed in list(TEST_SEEDS)[:tests]:
        phantom = generate_phantom("B", seed)
        for key, version in (("before", parent), ("after", adapted)):
            label = segmenter.segment(phantom.image, model=version, fast=True).label
            scores[key].append(image_dice(label, phantom.label))
    dice_before, dice_after = float(np.mean(scores["before"])), float(np.mean(scores["after"]))
    summary = {"model": model, "adapted": result["version"], "activated": result["activated"],
               "method": request.method, "schedule": result["schedule"],
               "learning_rate": result["learning_rate"], "iterations": result["iterations"],
               "device": str(chosen),
               "test_phantoms_dice_before": scores["before"], "test_phantoms_dice_after": scores["after"],
               "dice_before": dice_before, "dice_after": dice_after,
               "seconds": round(time.perf_counter() - started, 1)}
    (output / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    _say(f"6/6 wrote {output}/overlay_before.png, overlay_after.png, adaptation_report.png, "
         f"demo_summary.json ({summary['seconds']} s in all)")
    print(f"dice_before={dice_before:.3f} dice_after={dice_after:.3f}", flush=True)
    return 0


def _say(message: str) -> None:
    print(message, flush=True)


def write_overlay(ct: sitk.Image, truth: sitk.Image, prediction: sitk.Image, path: Path, title: str) -> Path:
    """The axial slice with the most lymph node: CT, truth (green) and prediction (red) outlines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = sitk.GetArrayViewFromImage(ct)
    truth_array = sitk.GetArrayViewFromImage(truth) > 0
    predicted = sitk.GetArrayViewFromImage(prediction) > 0
    k = int(np.argmax(truth_array.sum(axis=(1, 2)) + predicted.sum(axis=(1, 2)) * 0.5))
    spacing = ct.GetSpacing()
    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    axis.imshow(image[k], cmap="gray", vmin=-160, vmax=240, aspect=spacing[1] / spacing[0])
    if truth_array[k].any():
        axis.contour(truth_array[k], levels=[0.5], colors="lime", linewidths=1.2)
    if predicted[k].any():
        axis.contour(predicted[k], levels=[0.5], colors="red", linewidths=1.0)
    axis.set_title(f"{title}: truth green, model red (slice {k})", fontsize=9)
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
