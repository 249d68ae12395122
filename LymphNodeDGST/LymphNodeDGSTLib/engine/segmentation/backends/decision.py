"""What `auto` runs for one model version: the guard's decision, kept in the version's backend cache.

The accuracy guard (segmentation/backend_guard.py) compares each candidate's labels (OpenVINO bf16,
INT8) with torch fp32 on reference cases once per version, and records here which backend `auto`
uses and why. The record is a cache entry like a conversion (cache.py: written atomically, inside
the version's folder, so it goes when the version goes or the cache is cleared). Its key names
the OpenVINO and NNCF versions, the checkpoints, the input shape and whether the CPU has bf16, so
a new converter, new weights or other hardware decide again. `summary_of` gives the words for
`segment`'s one-line report and for the panel.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from LymphNodeDGSTLib.engine.segmentation.backends.cache import (FILES_KEY, META_FILE, cache_key, file_sha256,
                                                                 find_cached, store_conversion)

MIN_POOLED_DICE = 0.995  # candidate vs torch fp32, voxels pooled over all reference cases
INT8_MIN_SPEEDUP = 1.1   # INT8 network time vs f32 on the same cases (margin over timing noise)


@dataclass
class CandidateResult:
    """One backend checked against torch fp32 on the reference cases."""

    backend: str
    adopted: bool
    why: str  # e.g. "guard Dice 0.9981", "guard Dice 0.9712 < 0.995", "no bf16 CPU (...)"
    pooled_dice: float | None = None
    per_case_dice: dict[str, float] = field(default_factory=dict)
    voxels_differing: int | None = None
    network_seconds: float | None = None  # the network over all reference cases (tiles only)


@dataclass
class AutoDecision:
    chosen: str  # "openvino", "openvino-bf16" or "openvino-int8"
    f32: CandidateResult | None
    candidates: list[CandidateResult]
    cases: list[str]
    hardware: str
    made: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc)
                      .isoformat(timespec="seconds"))
    note: str | None = None  # why the guard could not run at all

    @classmethod
    def from_dict(cls, data: dict) -> "AutoDecision":
        data = {k: v for k, v in data.items() if k != FILES_KEY}  # the cache's own checksums
        data["f32"] = CandidateResult(**data["f32"]) if data.get("f32") else None
        data["candidates"] = [CandidateResult(**c) for c in data.get("candidates", [])]
        return cls(**data)


def decision_key(checkpoints: Sequence[Path], input_shape: Sequence[int], openvino: str,
                 nncf: str | None, bf16_tag: str) -> str:
    combined = hashlib.sha256("".join(file_sha256(Path(c)) for c in checkpoints).encode()).hexdigest()
    return cache_key("auto", f"{openvino}+nncf{nncf or '-'}+{bf16_tag}", combined, input_shape)


def store_decision(version_path: Path, key: str, decision: AutoDecision) -> Path:
    return store_conversion(version_path, key, lambda folder: None, asdict(decision))


def find_decision(version_path: Path, key: str) -> AutoDecision | None:
    folder = find_cached(version_path, key)
    if folder is None:
        return None
    try:
        return AutoDecision.from_dict(json.loads((folder / META_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # unreadable: decided again by the next background guard


def _short(backend: str) -> str:
    return backend.replace("openvino-", "")


def summary_of(decision: AutoDecision) -> str:
    """The words after the backend's name: "guard Dice 0.9981", or why f32 stayed."""
    if decision.note:
        return f"guard could not run: {decision.note}"
    chosen = next((c for c in decision.candidates if c.backend == decision.chosen), None)
    if chosen is not None:
        return chosen.why
    reasons = [f"{_short(c.backend)}: {c.why}" for c in decision.candidates]
    return "; ".join(reasons) if reasons else "no candidate to check"


def backend_line(used: str, detail: str | None) -> str:
    """'openvino-bf16, guard Dice 0.9981': what `segment` reports and the panel shows."""
    return f"{used}, {detail}" if detail else used
