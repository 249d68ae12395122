"""Fine-tuning a foundation nnU-Net with a sparse update policy (DGST and the comparison methods).

`SiteAdaptationTrainer` is an nnU-Net v2 trainer subclass (nnU-Net's exact constructor signature,
instantiated directly, never looked up by name). It keeps nnU-Net's data pipeline, augmentation,
deep-supervised Dice + cross-entropy loss and pseudo-Dice validation, and replaces the optimiser
step by `dgst.MaskedStepper`: only what the policy allows moves, bitwise. `fine_tune` is the
function the adaptation pipeline, the demo and the tests call.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from LymphNodeDGSTLib.engine import nnunet_env  # noqa: F401  (sets nnU-Net's environment first)

import numpy as np
import torch

from LymphNodeDGSTLib.engine.store.architectures import checkpoint_dict
from LymphNodeDGSTLib.adaptation.dgst import POLICY_NAMES, SPARSE_POLICY_NAMES, make_policy
from LymphNodeDGSTLib.adaptation.dgst.masked_step import MaskedStepper
from LymphNodeDGSTLib.adaptation.dgst.lora import merged_state_dict
from LymphNodeDGSTLib.errors import Cancelled, UserInputError
from LymphNodeDGSTLib.adaptation.nnunet_dataset import PreparedDataset, nnunet_folders
from LymphNodeDGSTLib.adaptation.weight_stats import weight_change_summary
from LymphNodeDGSTLib.engine.store.state_dicts import snapshot_state

# Learning rates of the authors' code (DGST.md, comparison methods).
DEFAULT_LEARNING_RATES = {"full": 1e-3, "bias": 1e-2, "norm": 1e-3, "lora": 1e-3,
                          "dgst": 1e-3, "random": 1e-3, "static": 1e-3,
                          # this project's variants: the paper's DGST rate
                          "dgst-ema": 1e-3, "dgst-split": 1e-3, "dgst-budget": 1e-3}
STATS_FILE = "adaptation_stats.json"

IterationCallback = Callable[[int, int, float], None]      # (done, total, loss)
EpochCallback = Callable[[int, dict], None]                 # (epoch, metrics)


# Bounds of the settings a user can give.
MAX_GAMMA = 1000
MAX_ITERATIONS = 10_000_000
MAX_LEARNING_RATE = 10.0


class TrainingDiverged(UserInputError):
    """The loss or the weights became NaN or infinite: the run is stopped, nothing published."""


def _check_int(option: str, value: object, low: int, high: int, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        about = f" ({meaning})" if meaning else ""
        raise UserInputError(f"{option} must be a whole number from {low} to {high}{about}; "
                             f"got {value!r}")


def _check_float(option: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    if (number is None or not math.isfinite(number) or number < low or (low_open and number == low)
            or number > high):
        lower = f"above {low:g}" if low_open else f"at least {low:g}"
        upper = f" and at most {high:g}" if math.isfinite(high) else ""
        raise UserInputError(f"{option} must be a finite number {lower}{upper}; got {value!r}")


def check_finite_weights(weights: dict, when: str) -> None:
    """TrainingDiverged if any floating tensor of `weights` holds NaN or inf."""
    bad = [name for name, tensor in weights.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise TrainingDiverged(f"training diverged {when}: {len(bad)} weight tensor(s) hold NaN or "
                               f"infinite values (e.g. {bad[0]}); nothing was published; try a "
                               "lower --lr")


@dataclass
class FineTuneSettings:
    """Hyper-parameters; the defaults are DGST.md's (50 epochs x 250 iterations, SGD 0.99 Nesterov)."""

    method: str = "dgst"
    gamma: int = 2
    iterations: int = 12500
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 5
    learning_rate: float | None = None
    momentum: float = 0.99
    nesterov: bool = True
    weight_decay: float = 3e-5
    max_grad_norm: float | None = 12.0
    foundation_l2: float = 0.0
    static_warmup_steps: int = 10
    seed: int = 0
    deep_supervision: bool = True
    selection_only: bool = False      # sparse methods: freeze norms, biases and head too

    def validate(self) -> "FineTuneSettings":
        """Refuse every number that cannot give a sane run (NaN, inf, negative, absurd)."""
        if self.method not in POLICY_NAMES:
            raise UserInputError(f"unknown method '{self.method}'; choose one of {', '.join(POLICY_NAMES)}")
        _check_int("--gamma", self.gamma, 1, MAX_GAMMA,
                   "entries updated per kernel; DGST uses small values (the authors use 2)")
        _check_int("--iterations", self.iterations, 1, MAX_ITERATIONS)
        _check_int("--iterations-per-epoch", self.iterations_per_epoch, 1, MAX_ITERATIONS)
        _check_int("--seed", self.seed, 0, 2**32 - 1)
        if self.learning_rate is not None:
            _check_float("--lr", self.learning_rate, 0.0, MAX_LEARNING_RATE, low_open=True)
        _check_float("--l2-to-foundation", self.foundation_l2, 0.0, float("inf"))
        if self.selection_only and self.method not in SPARSE_POLICY_NAMES:
            raise UserInputError(f"--selection-only needs a sparse method ({', '.join(SPARSE_POLICY_NAMES)}), "
                                 f"not '{self.method}'")
        return self

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_LEARNING_RATES[self.method]

    @property
    def epochs(self) -> int:
        return math.ceil(self.iterations / self.per_epoch)

    @property
    def per_epoch(self) -> int:
        return max(1, min(self.iterations_per_epoch, self.iterations))


@dataclass
class FineTuneResult:
    results_folder: Path
    seconds: float
    device: str
    settings: dict
    epochs: list[dict] = field(default_factory=list)
    entries_updated_per_iteration: list[int] = field(default_factory=list)
    weight_change: dict = field(default_factory=dict)
    step_summary: dict = field(default_factory=dict)


def _trainer_class():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.helpers import dummy_context, empty_cache

    class SiteAdaptationTrainer(nnUNetTrainer):
        """nnU-Net's trainer with the optimiser step replaced by a masked, policy-driven one."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.settings = FineTuneSettings()
            self.foundation_weights: dict | None = None
            self.policy = self.stepper = None
            self.on_iteration: IterationCallback | None = None
            self.on_epoch: EpochCallback | None = None
            self.should_stop: Callable[[], bool] | None = None
            self.iteration = 0
            self.epoch_records: list[dict] = []

        def configure(self, settings: FineTuneSettings, foundation_weights: dict) -> None:
            self.settings = settings
            self.foundation_weights = foundation_weights
            self.initial_lr = settings.lr
            self.weight_decay = settings.weight_decay
            self.num_iterations_per_epoch = settings.per_epoch
            self.num_val_iterations_per_epoch = settings.val_iterations_per_epoch
            self.num_epochs = settings.epochs
            self.enable_deep_supervision = settings.deep_supervision

        def _do_i_compile(self) -> bool:
            return False  # compiling costs more than a short fine-tune gains

        def print_to_log_file(self, *args, also_print_to_console=False, add_timestamp=True):
            super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)

        def configure_optimizers(self):
            self.network.load_state_dict(self.foundation_weights)
            self.policy = make_policy(self.settings.method, self.network, gamma=self.settings.gamma,
                                      seed=self.settings.seed,
                                      warmup_steps=self.settings.static_warmup_steps,
                                      selection_only=self.settings.selection_only)
            self.network.to(self.device)  # LoRA adapters are created on the CPU
            optimizer = torch.optim.SGD(self.policy.optimizer_groups(), self.initial_lr,
                                        momentum=self.settings.momentum, nesterov=self.settings.nesterov,
                                        weight_decay=self.weight_decay)
            self.stepper = MaskedStepper(self.policy, max_grad_norm=self.settings.max_grad_norm,
                                         foundation_l2=self.settings.foundation_l2)
            return optimizer, None

        def on_train_start(self):
            if not self.was_initialized:
                self.initialize()
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
            self.set_deep_supervision_enabled(self.enable_deep_supervision)
            empty_cache(self.device)

        def on_train_epoch_start(self):
            self.network.train()
            self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

        def train_step(self, batch: dict) -> dict:
            if self.should_stop is not None and self.should_stop():
                raise Cancelled("adaptation cancelled")
            data = batch["data"].to(self.device, non_blocking=True)
            target = batch["target"]
            target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
                else target.to(self.device, non_blocking=True)
            self._set_learning_rate()
            self.optimizer.zero_grad(set_to_none=True)
            autocast = torch.autocast("cuda") if self.device.type == "cuda" else dummy_context()
            with autocast:
                loss = self.loss(self.network(data), target)
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
                self.stepper.step(self.optimizer, self.grad_scaler)
                self.grad_scaler.update()
            else:
                loss.backward()
                self.stepper.step(self.optimizer)
            self.iteration += 1
            value = float(loss.detach().cpu())
            self._stop_if_diverged(value)
            if self.on_iteration is not None:
                self.on_iteration(self.iteration, self.settings.iterations, value)
            return {"loss": np.array(value)}

        def _stop_if_diverged(self, loss: float) -> None:
            """Stop at once when the loss or a trained weight is no longer finite: continuing
            only spreads NaN through the network."""
            if not math.isfinite(loss):
                raise TrainingDiverged(f"training diverged at iteration {self.iteration}: the loss "
                                       f"became {loss}; nothing was published; try a lower --lr")
            trained = [p for p in self.network.parameters() if p.requires_grad]
            if trained and not bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()):
                raise TrainingDiverged(f"training diverged at iteration {self.iteration}: weights "
                                       "became NaN or infinite; nothing was published; try a "
                                       "lower --lr")

        def _set_learning_rate(self) -> None:
            """nnU-Net's polynomial decay, per iteration (short runs have one or two epochs)."""
            progress = min(self.iteration / self.settings.iterations, 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = scheduled_learning_rate(self.initial_lr, progress, group.get("lr_scale", 1.0))

        def on_epoch_end(self):
            self.logger.log("epoch_end_timestamps", time.time(), self.current_epoch)
            validated = self.num_val_iterations_per_epoch > 0
            pseudo_dice = [float(d) for d in self.logger.get_value("dice_per_class_or_region", step=-1)] \
                if validated else []
            record = {
                "epoch": self.current_epoch + 1,
                "iterations": self.iteration,
                "train_loss": float(self.logger.get_value("train_losses", step=-1)),
                "val_loss": float(self.logger.get_value("val_losses", step=-1)) if validated else float("nan"),
                "pseudo_dice": float(np.nanmean(pseudo_dice)) if pseudo_dice else float("nan"),
                "lr": float(self.optimizer.param_groups[0]["lr"]),
            }
            self.epoch_records.append(record)
            if self.on_epoch is not None:
                self.on_epoch(record["epoch"], record)
            self.current_epoch += 1

        def run_training(self):
            self.on_train_start()
            try:
                self.train_until(self.settings.iterations)
            finally:
                self._finish_dataloaders()

        def train_until(self, iteration: int) -> None:
            """Train epochs (of at most iterations_per_epoch) until `iteration` iterations are
            done in all; the automatic schedule calls it once per held-out check."""
            while self.iteration < min(iteration, self.settings.iterations):
                self.on_epoch_start()
                self.on_train_epoch_start()
                steps = min(self.num_iterations_per_epoch, iteration - self.iteration)
                outputs = [self.train_step(next(self.dataloader_train)) for _ in range(steps)]
                self.on_train_epoch_end(outputs)
                if self.num_val_iterations_per_epoch > 0:  # 0: a rate probe, scored elsewhere
                    with torch.no_grad():
                        self.on_validation_epoch_start()
                        val = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                        self.on_validation_epoch_end(val)
                self.on_epoch_end()

        def _finish_dataloaders(self) -> None:
            for loader in (self.dataloader_train, self.dataloader_val):
                finish = getattr(loader, "_finish", None)
                if callable(finish):
                    finish()

        def adapted_weights(self) -> dict:
            if self.settings.method == "lora":
                return merged_state_dict(self.network)
            return snapshot_state(self.network.state_dict())

    return SiteAdaptationTrainer


def scheduled_learning_rate(initial: float, progress: float, lr_scale: float = 1.0) -> float:
    """nnU-Net's PolyLR at `progress` (0..1) times the parameter group's `lr_scale`."""
    return initial * lr_scale * (1 - progress) ** 0.9


def fine_tune(foundation_checkpoint: dict, dataset: PreparedDataset, work_dir: Path,
              settings: FineTuneSettings, device: torch.device,
              on_iteration: IterationCallback | None = None, on_epoch: EpochCallback | None = None,
              should_stop: Callable[[], bool] | None = None,
              trainer_class: type | None = None, fold: int | str = 0) -> FineTuneResult:
    """Fine-tune the foundation's weights on a prepared dataset; write a results folder.

    The results folder (`work_dir/results`) holds dataset.json, plans.json,
    fold_F/checkpoint_final.pth (F: `fold`, the foundation fold it was made from; trainer name
    `nnUNetTrainer`, so stock nnU-Net loads it) and `adaptation_stats.json` with what changed.
    Under DDP (`trainer_class` from `ddp_trainer`) every rank trains and only rank 0 writes.
    """
    settings.validate()
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    plans = copy.deepcopy(dataset.plans)
    plans["continue_training"] = False
    with nnunet_folders(work_dir, preprocessed=dataset.preprocessed_root):
        trainer = (trainer_class or _trainer_class())(plans, dataset.configuration, 0,
                                                      dataset.dataset_json, device)
        trainer.configure(settings, foundation_checkpoint["network_weights"])
        trainer.on_iteration, trainer.on_epoch, trainer.should_stop = on_iteration, on_epoch, should_stop
        trainer.run_training()
        weights = trainer.adapted_weights()
    check_finite_weights(weights, "by the end of training")

    result = FineTuneResult(work_dir / "results", time.perf_counter() - started, str(device),
                            asdict(settings), trainer.epoch_records,
                            list(trainer.stepper.entries_history),
                            weight_change_summary(foundation_checkpoint["network_weights"], weights),
                            trainer.stepper.summary())
    if trainer.local_rank != 0:
        return result
    write_results_folder(result, weights, foundation_checkpoint, dataset, settings, fold)
    return result


def write_results_folder(result: FineTuneResult, weights: dict, foundation_checkpoint: dict,
                         dataset: PreparedDataset, settings: FineTuneSettings,
                         fold: int | str = 0) -> Path:
    """`result.results_folder`: dataset.json, plans.json, fold_F/checkpoint_final.pth with
    `weights` (trainer name `nnUNetTrainer`, so stock nnU-Net loads it) and the stats file."""
    results = result.results_folder
    (results / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    saved_plans = copy.deepcopy(dataset.plans)
    checkpoint = checkpoint_dict(
        weights, saved_plans, dataset.dataset_json, configuration=dataset.configuration,
        fold=int(fold) if str(fold).isdigit() else fold,
        trainer_name="nnUNetTrainer",
        mirroring_axes=foundation_checkpoint.get("inference_allowed_mirroring_axes", (0, 1, 2)),
        extra={"current_epoch": len(result.epochs),
               "adaptation": {"method": settings.method, "gamma": settings.gamma}})
    torch.save(checkpoint, results / f"fold_{fold}" / "checkpoint_final.pth")
    (results / "plans.json").write_text(json.dumps(saved_plans, indent=2))
    (results / "dataset.json").write_text(json.dumps(dataset.dataset_json, indent=2))
    (results / STATS_FILE).write_text(json.dumps(_stats_document(result), indent=2))
    return results


def _stats_document(result: FineTuneResult) -> dict:
    return {
        "settings": result.settings,
        "device": result.device,
        "seconds": result.seconds,
        "epochs": result.epochs,
        "entries_updated_per_iteration": result.entries_updated_per_iteration,
        "step_summary": result.step_summary,
        "weight_change": result.weight_change,
    }
