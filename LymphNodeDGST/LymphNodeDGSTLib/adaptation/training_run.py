"""One fine-tuning run that is advanced in steps, scored between steps, and then dropped.

The automatic schedule's unit: a probe at one learning rate, or the training run at the chosen
rate. It is `fine_tune` cut open: the same trainer, settings and seeding, but the caller decides
when to stop and which weights to keep (`weights()` is a CPU copy taken at a check).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from LymphNodeDGSTLib.adaptation.nnunet_dataset import PreparedDataset, nnunet_folders
from LymphNodeDGSTLib.adaptation.trainer import (FineTuneResult, FineTuneSettings, IterationCallback,
                                                 EpochCallback, _trainer_class, check_finite_weights)
from LymphNodeDGSTLib.adaptation.weight_stats import weight_change_summary


class TrainingRun:
    """A trainer started from the foundation's weights; `advance_to(n)` trains up to iteration n.

    Seeded like `fine_tune` when it is created, so runs that differ only in the learning rate see
    the same batches and augmentations in the same order (a fair comparison of rates). Each run
    keeps its own random state between `advance_to` calls (nnU-Net's sampling and augmentation
    draw from the global generators), so a run continued after other runs trained in between is
    exactly the run it would have been alone.
    """

    def __init__(self, foundation_checkpoint: dict, dataset: PreparedDataset, work_dir: Path,
                 settings: FineTuneSettings, device: torch.device,
                 on_iteration: IterationCallback | None = None, on_epoch: EpochCallback | None = None,
                 should_stop: Callable[[], bool] | None = None):
        settings.validate()
        self.settings = settings
        self.foundation_checkpoint = foundation_checkpoint
        self.device = device
        self.started = time.perf_counter()
        torch.manual_seed(settings.seed)
        np.random.seed(settings.seed)
        plans = copy.deepcopy(dataset.plans)
        plans["continue_training"] = False
        # nnU-Net reads its folders from the environment when the trainer is made
        with nnunet_folders(work_dir, preprocessed=dataset.preprocessed_root):
            self.trainer = _trainer_class()(plans, dataset.configuration, 0, dataset.dataset_json,
                                            device)
        self.trainer.configure(settings, foundation_checkpoint["network_weights"])
        self.trainer.on_iteration, self.trainer.on_epoch = on_iteration, on_epoch
        self.trainer.should_stop = should_stop
        self._started = False
        self._random_state = _random_state(device)

    def set_callbacks(self, on_iteration: IterationCallback | None,
                      on_epoch: EpochCallback | None) -> None:
        self.trainer.on_iteration, self.trainer.on_epoch = on_iteration, on_epoch

    @property
    def iteration(self) -> int:
        return self.trainer.iteration

    def advance_to(self, iteration: int) -> None:
        """Train until `iteration` iterations are done (at most the settings' iterations)."""
        _set_random_state(self._random_state, self.device)
        try:
            if not self._started:
                self.trainer.on_train_start()
                self._started = True
            self.trainer.train_until(iteration)
        finally:
            self._random_state = _random_state(self.device)

    def weights(self) -> dict:
        """A CPU copy of the network's weights now (LoRA merged); TrainingDiverged if not finite."""
        weights = self.trainer.adapted_weights()
        check_finite_weights(weights, f"by iteration {self.iteration}")
        return weights

    def result(self, weights: dict, results_folder: Path) -> FineTuneResult:
        """What `fine_tune` returns, for `weights` (the kept checkpoint) and this run's history."""
        stepper = self.trainer.stepper
        return FineTuneResult(results_folder, time.perf_counter() - self.started, str(self.device),
                              asdict(self.settings), list(self.trainer.epoch_records),
                              list(stepper.entries_history) if stepper else [],
                              weight_change_summary(self.foundation_checkpoint["network_weights"], weights),
                              stepper.summary() if stepper else {})

    def close(self) -> None:
        if self._started:
            self.trainer._finish_dataloaders()
            self._started = False

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _random_state(device: torch.device) -> tuple:
    """The global generators nnU-Net's data loading, augmentation and training draw from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_random_state(state: tuple, device: torch.device) -> None:
    python, numpy, cpu, cuda = state
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
