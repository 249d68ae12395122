"""Held-out Dice of weights still in memory: how the automatic schedule scores a checkpoint.

The product's own segmenter does the work (body crop, nnU-Net's preprocessing, sliding window,
resampling back to the case's grid), so a score here is the Dice the published version would get
on the same case in fast mode. Each case is preprocessed once; each score only swaps the network's
weights (`Segmenter.use_weights`) and runs the sliding window without mirroring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.adaptation.metrics import dice
from LymphNodeDGSTLib.engine.store.models import ModelVersion

# (case id, CT image file, label file): a case of the library, or a benchmark's validation case
HeldOutCase = tuple[str, Path, Path]


class Scorer(Protocol):
    """Scores a set of network weights; higher is better (the schedule's only view of the cases)."""

    def score(self, weights: dict) -> float: ...


class HeldOutScorer:
    """Mean Dice over held-out cases of a network's weights, through the product's segmenter."""

    def __init__(self, parent: ModelVersion, cases: Sequence[HeldOutCase], device: str,
                 before_each_case: Callable[[], None] | None = None):
        """`parent`: the version whose plans preprocess the cases (an unpublished results folder
        is `ModelVersion(name, 0, folder, {})`)."""
        from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter

        self.case_ids = [case_id for case_id, _, _ in cases]
        self.before_each_case = before_each_case or (lambda: None)
        self.segmenter = Segmenter(None, device=device, default_version=parent, backend="torch")
        self.prepared = []
        self.truths = []
        for _, image, label in cases:
            self.before_each_case()
            self.prepared.append(self.segmenter.prepare(sitk.ReadImage(str(image))))
            self.truths.append(sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0)

    def score_loaded(self) -> float:
        """Mean Dice of the version as installed (the parent, every fold): the reference."""
        return self._mean_dice()

    def score(self, weights: dict) -> float:
        self.segmenter.use_weights(weights)
        return self._mean_dice()

    def per_case(self) -> list[float]:
        return list(self._last)

    def _mean_dice(self) -> float:
        self._last = []
        for prepared, truth in zip(self.prepared, self.truths):
            self.before_each_case()
            label = self.segmenter.segment_prepared(prepared, fast=True).label
            self._last.append(dice(sitk.GetArrayViewFromImage(label) > 0, truth))
        return float(np.mean(self._last))
