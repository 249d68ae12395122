"""The adaptation trainer under PyTorch DDP (one process per rank, started by torchrun).

nnU-Net's own DDP path does the distributed work: its trainer splits the global batch over the
ranks, converts norms to SyncBatchNorm, wraps the network in DistributedDataParallel and
all-gathers losses and pseudo-Dice counts. DDP averages the gradients across ranks during
backward, before `MaskedStepper.step` runs, so every rank selects its DGST entries from the same
all-reduced gradient and takes the same masked step: the per-filter bound and the bitwise
guarantees of one device hold on every rank, and the ranks' weights stay identical.

Two things nnU-Net assumes that do not hold here are adjusted:
- nnU-Net puts rank r on `cuda:r` and wraps with `device_ids=[r]`. On the CPU (gloo, for tests
  and CI) DDP must get no device ids; with more ranks than GPUs ranks share them (gloo).
- Data and augmentation are reseeded with seed + rank, so the ranks draw different patches.

`audit_path`, when set, makes every rank write what it did (per-step digest of the selected
masks, the most entries any output filter changed in one step, a digest of the final weights):
the two-process test compares the ranks with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from LymphNodeDGSTLib.adaptation.trainer import _trainer_class


def weights_sha256(state: dict) -> str:
    """A digest of a state dict's names, dtypes and exact values."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def _ddp_device_ids(device: torch.device):
    """Within the block, nnU-Net's `DDP(net, device_ids=[rank])` uses this rank's real device."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module

    original = nnunet_trainer_module.DDP
    ids = [device.index or 0] if device.type == "cuda" else None

    def wrap(network, device_ids=None, **kwargs):
        return original(network, device_ids=ids, **kwargs)

    nnunet_trainer_module.DDP = wrap
    try:
        yield
    finally:
        nnunet_trainer_module.DDP = original


def distributed_trainer_class(audit_path: str | Path | None = None):
    base = _trainer_class()

    class DistributedSiteAdaptationTrainer(base):
        """`SiteAdaptationTrainer` on nnU-Net's DDP path, any device, optionally audited."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.device = device  # nnU-Net would force cuda:rank
            self.audit: list[dict] = []

        def initialize(self):
            with _ddp_device_ids(self.device):
                super().initialize()

        def configure_optimizers(self):
            optimizer, scheduler = super().configure_optimizers()
            if audit_path is not None:
                self._audit_steps()
            return optimizer, scheduler

        def on_train_start(self):
            super().on_train_start()
            seed = self.settings.seed + self.local_rank
            np.random.seed(seed)
            torch.manual_seed(seed)

        def run_training(self):
            super().run_training()
            if audit_path is not None:
                Path(audit_path).mkdir(parents=True, exist_ok=True)
                record = {"rank": self.local_rank, "steps": self.audit,
                          "weights_sha256": weights_sha256(self.adapted_weights()),
                          "batch_size": self.batch_size}
                (Path(audit_path) / f"rank-{self.local_rank}.json").write_text(json.dumps(record))

        def adapted_weights(self) -> dict:
            wrapped = self.network
            if self.is_ddp:
                self.network = wrapped.module
            try:
                return super().adapted_weights()
            finally:
                self.network = wrapped

        def _audit_steps(self) -> None:
            """Record each step's selection and what it changed, per output filter."""
            policy, stepper = self.policy, self.stepper
            infos = {id(info.parameter): info for info in policy.infos if info.layout is not None}
            plan_of_policy, step_of_stepper, last = policy.plan, stepper.step, {}

            def plan():
                last["plan"] = plan_of_policy()
                return last["plan"]

            def step(optimizer, scaler=None):
                before = {pid: info.parameter.detach().clone() for pid, info in infos.items()}
                report = step_of_stepper(optimizer, scaler)
                digest, most = hashlib.sha256(), 0
                for parameter, mask, _ in last["plan"].masked:
                    digest.update(mask.cpu().numpy().tobytes())
                    info = infos.get(id(parameter))
                    if info is not None:
                        changed = (parameter.detach() != before[id(parameter)])
                        most = max(most, int(info.layout.to_filters(changed).sum(dim=1).max()))
                self.audit.append({"masks_sha256": digest.hexdigest(), "max_changed_per_filter": most,
                                   "entries_updated": report.entries_updated})
                return report

            policy.plan, stepper.step = plan, step

    return DistributedSiteAdaptationTrainer
