"""Site cases as an nnU-Net preprocessed dataset, made with the foundation model's own plans.

No re-planning: the cases are resampled to the foundation's spacing and normalised with its CT
intensity statistics by nnU-Net's own `DefaultPreprocessor`, exactly as the foundation's training
data were. What planning would normally write beside the data (dataset.json, plans.json, the
split) is written here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from LymphNodeDGSTLib.engine import nnunet_env  # noqa: F401  (sets nnU-Net's environment first)


@dataclass(frozen=True)
class TrainingCase:
    case_id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class PreparedDataset:
    """Where nnU-Net's trainer will find the data: set nnUNet_preprocessed to `preprocessed_root`."""

    preprocessed_root: Path
    dataset_name: str
    plans: dict
    dataset_json: dict
    configuration: str
    case_ids: list[str]

    @property
    def dataset_folder(self) -> Path:
        return self.preprocessed_root / self.dataset_name


def prepare_dataset(cases: Sequence[TrainingCase], plans: dict, foundation_dataset_json: dict,
                    configuration: str, preprocessed_root: Path,
                    progress: Callable[[int, int], None] | None = None) -> PreparedDataset:
    """Preprocess `cases` with the foundation's plans into `preprocessed_root/DATASET/`."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_name = plans["dataset_name"]
    dataset_folder = Path(preprocessed_root) / dataset_name
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    data_folder = dataset_folder / configuration_manager.data_identifier
    data_folder.mkdir(parents=True, exist_ok=True)
    dataset_json = dict(foundation_dataset_json)
    dataset_json["numTraining"] = len(cases)
    dataset_json["file_ending"] = ".nii.gz"

    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    for index, case in enumerate(cases):
        with contextlib.redirect_stdout(io.StringIO()):
            preprocessor.run_case_save(str(data_folder / case.case_id), [str(case.image)],
                                       str(case.label), plans_manager, configuration_manager,
                                       dataset_json)
        if progress:
            progress(index + 1, len(cases))

    case_ids = [case.case_id for case in cases]
    _write_json(dataset_folder / "dataset.json", dataset_json)
    _write_json(dataset_folder / "plans.json", plans)
    # Training uses every case; nnU-Net's per-epoch pseudo Dice is computed on the same cases.
    # The honest held-out evaluation happens outside the trainer, on cases it never saw.
    _write_json(dataset_folder / "splits_final.json", [{"train": case_ids, "val": case_ids}])
    return PreparedDataset(Path(preprocessed_root), dataset_name, plans, dataset_json,
                           configuration, case_ids)


@contextlib.contextmanager
def nnunet_folders(work_dir: Path, preprocessed: Path | None = None):
    """Point nnU-Net's three folders into `work_dir` (and an existing preprocessed root) for the
    duration of a training run."""
    folders = {name: work_dir / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    if preprocessed is not None:
        folders["nnUNet_preprocessed"] = Path(preprocessed)
    previous = {name: os.environ.get(name) for name in folders}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(folder)
    try:
        yield folders
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2))
