"""The accuracy guard: which faster OpenVINO backend `auto` may use for a model version, decided once.

The first time `auto` converts a version, a background process (`python -m` this module, started
by backends/prepare.py) converts it to OpenVINO f32 and then checks the candidates against torch
fp32 on reference cases (backends/reference.py: small phantoms and the site's case library):
- OpenVINO bf16, only where the CPU computes bf16 natively (backends/hardware.py);
- OpenVINO INT8, when NNCF is installed: quantised on the calibration cases, and adopted only when
  its network time on the reference cases is also at least INT8_MIN_SPEEDUP x f32's.
Each candidate segments every reference case as `segment --fast` would; its labels are compared
with torch fp32's with the voxels pooled over all cases (a small label makes a per-case Dice
jumpy), and a pooled Dice of at least MIN_POOLED_DICE adopts it. The fastest adopted candidate
wins, else f32 stays; the decision, the per-case figures and why each candidate was or was not
adopted are stored with the version's backend cache (backends/decision.py).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Sequence

from LymphNodeDGSTLib.engine import nnunet_env  # noqa: F401  (sets nnU-Net's environment first)

import numpy as np
import torch

from LymphNodeDGSTLib.engine.segmentation.backends.calibration import calibration_set, nncf_version
from LymphNodeDGSTLib.engine.segmentation.backends.choice import (auto_decision_key, network_input_shape,
                                                                  version_input_shape)
from LymphNodeDGSTLib.engine.segmentation.backends.decision import (INT8_MIN_SPEEDUP, MIN_POOLED_DICE, AutoDecision,
                                                                    CandidateResult, store_decision)
from LymphNodeDGSTLib.engine.segmentation.backends.hardware import detect_bf16
from LymphNodeDGSTLib.engine.segmentation.backends.networks import ensure_converted, one_line
from LymphNodeDGSTLib.engine.segmentation.backends.prepare import main, prepare
from LymphNodeDGSTLib.engine.segmentation.backends.reference import (CALIBRATION, GUARD, ReferenceCase,
                                                                     reference_cases)
from LymphNodeDGSTLib.engine.segmentation.segmenter import Segmenter, load_predictor
from LymphNodeDGSTLib.engine.store.architectures import read_json
from LymphNodeDGSTLib.engine.store.models import ModelVersion
from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints


class NetworkClock:
    """A progress callback adding up the network's time: from preprocessing done to the last tile."""

    def __init__(self):
        self.seconds = 0.0
        self._started: float | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage == "preprocess" and done == total:
            self._started = now
        elif stage == "predict" and done == total and self._started is not None:
            self.seconds += now - self._started
            self._started = None


def segment_cases(version: ModelVersion, backend: str,
                  cases: Sequence[ReferenceCase]) -> tuple[list[np.ndarray], float]:
    """Labels of every case with `backend` (as `segment --fast`), and the network's seconds;
    raises when the backend did not run."""
    segmenter = Segmenter(None, device="cpu", default_version=version, backend=backend)
    clock = NetworkClock()
    labels = [segmenter.segment_array(case.array_zyx, case.spacing_zyx, fast=True, progress=clock)[0]
              for case in cases]
    if segmenter.backend_choice.used != backend:
        raise RuntimeError(segmenter.backend_choice.reason or f"{backend} did not run")
    return labels, clock.seconds


def pooled_dice(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> tuple[float, int]:
    """Dice of the labelled voxels (same label in both) over all cases at once, and the number
    of voxels whose label differs. Both empty: 1.0."""
    agree = labelled = differing = 0
    for ours, theirs in zip(reference, candidate, strict=True):
        agree += 2 * int(np.count_nonzero((ours == theirs) & (ours > 0)))
        labelled += int(np.count_nonzero(ours > 0)) + int(np.count_nonzero(theirs > 0))
        differing += int(np.count_nonzero(ours != theirs))
    return (agree / labelled if labelled else 1.0), differing


def judge(backend: str, reference: list[np.ndarray], labels: list[np.ndarray], seconds: float,
          names: list[str], f32_seconds: float | None, min_speedup: float | None) -> CandidateResult:
    dice, differing = pooled_dice(reference, labels)
    per_case = {name: round(pooled_dice([r], [c])[0], 6) for name, r, c in zip(names, reference, labels)}
    adopted = dice >= MIN_POOLED_DICE
    why = f"guard Dice {dice:.4f}" + ("" if adopted else f" < {MIN_POOLED_DICE}")
    if adopted and min_speedup is not None:
        speedup = f32_seconds / seconds if seconds > 0 else float("inf")
        adopted = speedup >= min_speedup
        why += f", {speedup:.2f}x f32" + ("" if adopted else f" (< {min_speedup}x)")
    return CandidateResult(backend, adopted, why, round(dice, 6), per_case, differing, round(seconds, 3))


def quantize_version(version: ModelVersion, cases: Sequence[ReferenceCase]) -> None:
    """Every fold's INT8 model into the version's cache, calibrated on `cases` only."""
    predictor = load_predictor(version, torch.device("cpu"))
    shape = network_input_shape(predictor)
    calibrate = functools.cache(lambda: calibration_set(predictor, cases))
    for weights, checkpoint in zip(predictor.list_of_parameters, find_checkpoints(version.path).values()):
        ensure_converted("openvino-int8", predictor.network, weights, checkpoint, version.path, shape,
                         calibrate=calibrate)


def decide(version: ModelVersion, guard_cases: Sequence[ReferenceCase],
           calibration_cases: Sequence[ReferenceCase]) -> AutoDecision:
    """Check the candidates on `guard_cases` against torch fp32 (see the module's docstring)."""
    if not guard_cases:
        raise RuntimeError("no reference cases")  # else an empty comparison would pass anything
    bf16 = detect_bf16()
    names = [case.name for case in guard_cases]
    reference, _ = segment_cases(version, "torch", guard_cases)
    f32_labels, f32_seconds = segment_cases(version, "openvino", guard_cases)
    f32 = judge("openvino", reference, f32_labels, f32_seconds, names, None, None)

    def check(backend: str, min_speedup: float | None) -> CandidateResult:
        try:
            labels, seconds = segment_cases(version, backend, guard_cases)
        except Exception as error:
            return CandidateResult(backend, False, f"failed: {one_line(error)}")
        return judge(backend, reference, labels, seconds, names, f32_seconds, min_speedup)

    candidates = [check("openvino-bf16", None) if bf16.native else
                  CandidateResult("openvino-bf16", False, "no bf16 CPU")]
    if nncf_version() is None:
        candidates.append(CandidateResult("openvino-int8", False, "nncf is not installed"))
    else:
        try:
            quantize_version(version, calibration_cases)
        except Exception as error:
            candidates.append(CandidateResult("openvino-int8", False, one_line(error)))
        else:
            candidates.append(check("openvino-int8", INT8_MIN_SPEEDUP))
    adopted = [c for c in candidates if c.adopted]
    chosen = min(adopted, key=lambda c: c.network_seconds).backend if adopted else "openvino"
    return AutoDecision(chosen, f32, candidates, names, bf16.evidence)


def decide_and_store(version: ModelVersion, guard_cases: Sequence[ReferenceCase] | None = None,
                     calibration_cases: Sequence[ReferenceCase] | None = None) -> AutoDecision:
    """Decide for `version` (cases from the reference provider unless given) and store the
    decision; a guard that cannot run at all is stored too (f32 stays, with the reason), so it
    is not retried on every run."""
    try:
        guard_cases = guard_cases if guard_cases is not None else reference_cases(version.path, GUARD)
        if calibration_cases is None and nncf_version() is not None:
            calibration_cases = reference_cases(version.path, CALIBRATION)
        decision = decide(version, guard_cases, calibration_cases or [])
    except Exception as error:
        decision = AutoDecision("openvino", None, [], [], detect_bf16().evidence, note=one_line(error))
    checkpoints = list(find_checkpoints(version.path).values())
    store_decision(version.path, auto_decision_key(checkpoints, version_input_shape(version.path)),
                   decision)
    return decision


def version_at(version_path: Path) -> ModelVersion:
    """The store version in `version_path` (`<store>/<NAME>/versions/<N>`)."""
    metadata = read_json(version_path / "version.json") if (version_path / "version.json").is_file() else {}
    return ModelVersion(version_path.parents[1].name, int(version_path.name), version_path, metadata)


def convert_and_guard(version_path: Path, backend: str) -> None:
    """The background process's work: convert to OpenVINO f32, then decide bf16/INT8."""
    prepare(version_path, backend)
    decide_and_store(version_at(version_path))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], work=convert_and_guard))
