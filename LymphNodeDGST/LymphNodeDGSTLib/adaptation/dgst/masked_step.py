"""The masked optimiser step: any torch optimiser, applied so that every entry the policy did not
allow is bitwise unchanged (the gradient is masked before clipping and the step, and disallowed
entries are restored after it, so momentum and weight decay cannot move them).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from LymphNodeDGSTLib.adaptation.dgst.policies import UpdatePolicy
from LymphNodeDGSTLib.adaptation.selection_stats import SelectionPersistence


@dataclass(frozen=True)
class StepReport:
    """What one `MaskedStepper.step` did."""

    stepped: bool                 # False when a GradScaler skipped the step (non-finite gradients)
    entries_updated: int          # entries the step was allowed to change (0 when skipped)
    sparse_entries: int           # of which selected entries of partially trained tensors
    grad_norm: float | None       # norm of the applied gradients, when clipping


class MaskedStepper:
    """Runs an optimiser step that changes only what the policy allows, bitwise.

    Per step: ask the policy for the plan; drop the gradients of parameters not allowed at all
    (torch optimisers skip parameters whose grad is None); zero the gradients of disallowed
    entries; add the optional L2-to-foundation gradient `foundation_l2 * (w - w_foundation)` on
    the allowed entries; clip the applied gradients; add coupled weight decay (SGD, Adam, ...:
    `weight_decay * w`) on the allowed entries only and step with the group's weight decay set to
    0; snapshot the partially allowed tensors; step; copy the snapshot back into every disallowed
    entry. So a disallowed entry's value never changes, and its optimiser state evolves exactly as
    with a zero gradient (SGD momentum: `buf = momentum * buf`, no weight-decay term). Decoupled
    weight decay (AdamW) acts on the value only, which is restored.
    """

    def __init__(self, policy: UpdatePolicy, max_grad_norm: float | None = None,
                 foundation_l2: float = 0.0) -> None:
        self.policy = policy
        self.max_grad_norm = max_grad_norm
        self.foundation_l2 = float(foundation_l2)
        self.foundation: dict[int, torch.Tensor] = {}
        if self.foundation_l2 > 0:
            self.foundation = {id(p): p.detach().clone() for p in policy.trainable_parameters()}
        self.entries_history: list[int] = []
        self.persistence = SelectionPersistence()
        self.steps = 0
        self.steps_applied = 0
        self._zeros: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _zero(self, like: torch.Tensor) -> torch.Tensor:
        """A cached 0-dim zero on `like`'s device and dtype (torch.where needs a tensor for out=)."""
        key = (like.device, like.dtype)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros((), device=like.device, dtype=like.dtype)
        return self._zeros[key]

    @property
    def total_entries_updated(self) -> int:
        return sum(self.entries_history)

    def step(self, optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler | None" = None) -> StepReport:
        """Select, mask, clip, step (through `scaler` when given) and restore. Call after backward."""
        if scaler is not None:
            _unscale_once(scaler, optimizer)
        plan = self.policy.plan()
        whole = [p for p in plan.whole if p.grad is not None]
        masked = [(p, mask, count) for p, mask, count in plan.masked if p.grad is not None]
        allowed = {id(p) for p in whole} | {id(p) for p, _, _ in masked}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in allowed:
                    p.grad = None

        for p, mask, _ in masked:
            torch.where(mask, p.grad, self._zero(p.grad), out=p.grad)
        if self.foundation_l2 > 0:
            self._add_foundation_gradient(whole, masked)

        grad_norm = None
        applied = whole + [p for p, _, _ in masked]
        if self.max_grad_norm is not None and applied:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(applied, self.max_grad_norm))

        decays = self._apply_weight_decay_to_allowed(optimizer, masked)
        snapshots = [p.detach().clone() for p, _, _ in masked]
        try:
            stepped = _run_optimizer_step(optimizer, scaler)
        finally:
            for group, decay in decays:
                group["weight_decay"] = decay
        if stepped:
            with torch.no_grad():
                for (p, mask, _), snapshot in zip(masked, snapshots):
                    torch.where(mask, p, snapshot, out=p)
            self.persistence.update(masked)
        del snapshots
        self.policy.after_step(stepped)

        sparse_entries = sum(count for _, _, count in masked) if stepped else 0
        entries = (sum(p.numel() for p in whole) + sparse_entries) if stepped else 0
        self.steps += 1
        self.steps_applied += int(stepped)
        self.entries_history.append(entries)
        return StepReport(stepped, entries, sparse_entries, grad_norm)

    def _apply_weight_decay_to_allowed(self, optimizer: torch.optim.Optimizer,
                                       masked: list[tuple[nn.Parameter, torch.Tensor, int]]
                                       ) -> list[tuple[dict, float]]:
        """Add coupled weight decay to the gradients of allowed entries only; set the groups'
        weight decay to 0 for the step. Returns (group, weight decay) pairs to restore."""
        if isinstance(optimizer, torch.optim.AdamW):
            return []
        masks = {id(p): mask for p, mask, _ in masked}
        changed = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                decay = group.get("weight_decay", 0.0)
                if not decay or group.get("decoupled_weight_decay", False):
                    continue
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    mask = masks.get(id(p))
                    if mask is None:
                        p.grad.add_(p, alpha=decay)
                    else:
                        p.grad.add_(torch.where(mask, p, self._zero(p)), alpha=decay)
                changed.append((group, decay))
                group["weight_decay"] = 0.0
        return changed

    def _add_foundation_gradient(self, whole: list[nn.Parameter],
                                 masked: list[tuple[nn.Parameter, torch.Tensor, int]]) -> None:
        with torch.no_grad():
            for p in whole:
                p.grad.add_(p - self.foundation[id(p)], alpha=self.foundation_l2)
            for p, mask, _ in masked:
                pull = torch.where(mask, p - self.foundation[id(p)], self._zero(p))
                p.grad.add_(pull, alpha=self.foundation_l2)

    def summary(self) -> dict:
        """JSON-serialisable totals for the training log."""
        described = self.policy.describe()
        steps = max(self.steps_applied, 1)
        return {**described,
                **self.persistence.summary(),
                "steps": self.steps,
                "steps_applied": self.steps_applied,
                "entries_updated_total": self.total_entries_updated,
                "entries_updated_per_step_mean": self.total_entries_updated / steps,
                "share_updated_per_step_mean": (self.total_entries_updated / steps)
                / max(described["parameters"], 1)}


def _unscale_once(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer) -> None:
    """`scaler.unscale_(optimizer)` unless the caller already did it in this iteration."""
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as error:
        if "already been called" not in str(error):
            raise


def _run_optimizer_step(optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler | None") -> bool:
    """Step (through the scaler when given); True if the optimiser really stepped."""
    ran = []
    handle = optimizer.register_step_post_hook(lambda *_: ran.append(True))
    try:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
    finally:
        handle.remove()
    return bool(ran)
