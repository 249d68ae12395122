"""Reference cases: the CTs a candidate backend is checked on (the guard) and INT8 is calibrated on.

The cases come from a provider named by "module:function" (like a job kind), because they live
above the engine: small demo phantoms (demo/phantom.py) and the site's case library
(adaptation/cases). The engine only names the provider and calls it in the process that needs the
cases (the background guard, or an explicit `--backend openvino-int8` quantising now); it never
imports those layers. Tests pass cases directly.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# provider(version_path, purpose) -> list[ReferenceCase]; purpose is "guard" or "calibration"
REFERENCE_CASES_PROVIDER = "LymphNodeDGSTLib.demo.reference_cases:reference_cases"
GUARD, CALIBRATION = "guard", "calibration"


@dataclass(frozen=True)
class ReferenceCase:
    """One CT in SimpleITK's axis order (z, y, x), with its spacing (z, y, x) in mm."""

    name: str
    array_zyx: np.ndarray
    spacing_zyx: tuple[float, float, float]


CaseProvider = Callable[[Path, str], Sequence[ReferenceCase]]


def load_provider(spec: str = REFERENCE_CASES_PROVIDER) -> CaseProvider:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def reference_cases(version_path: Path, purpose: str,
                    spec: str = REFERENCE_CASES_PROVIDER) -> list[ReferenceCase]:
    """The provider's cases for `purpose`; raises when it has none (nothing to check against)."""
    cases = list(load_provider(spec)(Path(version_path), purpose))
    if not cases:
        raise RuntimeError(f"no reference cases for the {purpose}")
    return cases
