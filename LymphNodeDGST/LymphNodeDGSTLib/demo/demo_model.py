"""The bundled demo model: a small nnU-Net trained on site-A phantoms, and how it is found.

It is NOT a clinical model. It exists so a new user sees the whole loop (segment, correct, adapt)
work in minutes, and so the tests and benchmarks have a model that really segments something.

Re-create it (seeded; about 15 minutes on a 2-core CPU):
    python -m LymphNodeDGSTLib.demo.demo_model --output LymphNodeDGST/Resources/DemoModel/lymphnode-demo.zip
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from LymphNodeDGSTLib.demo.demo_archive import DEMO_MODEL_NAME, DEMO_ZIP_NAME, locate_demo_model  # noqa: F401
from LymphNodeDGSTLib.engine.store.architectures import UNetSpec, build_network, make_dataset_json, make_plans

TRAINING_SEED_OFFSET = 1000       # phantoms 1000.. train the model
VALIDATION_SEED_OFFSET = 5000     # phantoms 5000.. check it


def demo_spec(intensity_properties: dict | None = None) -> UNetSpec:
    """A 4-stage PlainConvUNet on site A's grid (3 mm slices, 1.2 mm pixels), about 1 M parameters."""
    spec = UNetSpec(
        features_per_stage=(16, 32, 64, 96),
        patch_size=(16, 80, 80),
        spacing=(3.0, 1.2, 1.2),
        strides=([1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]),
        kernel_sizes=([1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]),
        dataset_name="Dataset902_LymphNodePhantomA",
    )
    if intensity_properties:
        spec.intensity_properties = intensity_properties
    return spec


def ensure_default_model(store) -> str | None:
    """Install the demo model when the store has no model at all; its reference, else None."""
    if store.names():
        return None
    archive = locate_demo_model()
    if archive is None:
        return None
    return store.install(archive, name=DEMO_MODEL_NAME, show_progress=False).ref


def foreground_intensity_properties(images_and_labels) -> dict:
    """nnU-Net's fingerprint of CT intensities: statistics of the voxels inside the labels."""
    import SimpleITK as sitk

    values = []
    for image_path, label_path in images_and_labels:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))) > 0
        values.append(image[label].astype(np.float64))
    voxels = np.concatenate(values)
    return {"max": float(voxels.max()), "mean": float(voxels.mean()), "median": float(np.median(voxels)),
            "min": float(voxels.min()), "percentile_00_5": float(np.percentile(voxels, 0.5)),
            "percentile_99_5": float(np.percentile(voxels, 99.5)), "std": float(voxels.std())}


def train_demo_model(output_zip: Path, seed: int = 0, cases: int = 16, iterations: int = 1500,
                     device: str = "auto", validation_cases: int = 3) -> dict:
    """Train the demo model from scratch on site-A phantoms and write it as a results-folder zip."""
    import torch

    from LymphNodeDGSTLib.engine.store.architectures import checkpoint_dict
    from LymphNodeDGSTLib.engine.segmentation.devices import choose_device
    from LymphNodeDGSTLib.adaptation.nnunet_dataset import TrainingCase, prepare_dataset
    from LymphNodeDGSTLib.demo.phantom import write_phantoms
    from LymphNodeDGSTLib.adaptation.trainer import FineTuneSettings, fine_tune

    chosen = choose_device(device)
    with tempfile.TemporaryDirectory(prefix="lndgst-demo-model-") as scratch:
        work = Path(scratch)
        pairs = write_phantoms(work / "phantoms", "A", cases, seed=TRAINING_SEED_OFFSET + seed)
        spec = demo_spec(foreground_intensity_properties(pairs))
        plans, dataset_json = make_plans(spec), make_dataset_json(spec.labels, cases)
        torch.manual_seed(seed)
        initial = checkpoint_dict(build_network(plans, dataset_json).state_dict(), plans, dataset_json)
        dataset = prepare_dataset([TrainingCase(f"phantomA_{i:03d}", image, label)
                                   for i, (image, label) in enumerate(pairs)],
                                  plans, dataset_json, "3d_fullres", work / "preprocessed")
        settings = FineTuneSettings(method="full", iterations=iterations, iterations_per_epoch=100,
                                    learning_rate=1e-2, seed=seed)

        def report(epoch: int, record: dict) -> None:
            print(f"epoch {epoch}: loss {record['train_loss']:.3f} pseudo Dice "
                  f"{record['pseudo_dice']:.3f}", flush=True)

        result = fine_tune(initial, dataset, work / "training", settings, chosen, on_epoch=report)
        summary = {"cases": cases, "iterations": iterations, "seed": seed, "device": str(chosen),
                   "training_seconds": round(result.seconds, 1),
                   "validation_dice": validate(result.results_folder, validation_cases, chosen)}
        (result.results_folder / "demo_model.json").write_text(json.dumps(summary, indent=2))
        write_zip(result.results_folder, output_zip)
    return summary


def validate(results_folder: Path, count: int, device) -> list[float]:
    """Dice of the trained model on unseen site-A phantoms (accurate mode)."""
    from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter
    from LymphNodeDGSTLib.adaptation.metrics import image_dice
    from LymphNodeDGSTLib.demo.phantom import generate_phantom

    segmenter = Segmenter.for_results_folder(results_folder, device=str(device), name=DEMO_MODEL_NAME)
    scores = []
    for index in range(count):
        phantom = generate_phantom("A", VALIDATION_SEED_OFFSET + index)
        label = segmenter.segment(phantom.image).label
        scores.append(round(image_dice(label, phantom.label), 4))
    return scores


def write_zip(results_folder: Path, output_zip: Path) -> None:
    output_zip.parent.mkdir(parents=True, exist_ok=True)
    partial = output_zip.with_name(output_zip.name + ".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name in ("dataset.json", "plans.json", "demo_model.json", "fold_0/checkpoint_final.pth"):
            bundle.write(results_folder / name, f"{DEMO_MODEL_NAME}/{name}")
    os.replace(partial, output_zip)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the LymphNodeDGST demo model on site-A phantoms.")
    parser.add_argument("--output", type=Path, required=True, help="zip to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    summary = train_demo_model(args.output, args.seed, args.cases, args.iterations, args.device)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
