"""The reference cases of the backend accuracy guard and of INT8 calibration.

engine/segmentation/backends/reference.py names `reference_cases` as its provider (the engine
cannot import this layer). What it gives, capped so that the guard stays a few minutes of
background work even for the 30.4 M network:
- guard: two small demo phantoms (site A and site B, seed 0: 128x128x32 and 128x128x80 voxels,
  one 40x192x192 tile each for the default network), plus at most MAX_LIBRARY_CASES cases of the
  site's case library (the newest ids), each cut to its label's box plus LIBRARY_MARGIN_MM (the
  region where labels can differ; the rest would only add tiles);
- calibration: the same library cases when the library has any, else the phantoms.
The case library is the home's (`<home>/models/<NAME>/versions/<N>` -> `<home>/cases`); a model
store outside a home has none. A library case that does not read is skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.adaptation.cases.library import CaseLibrary
from LymphNodeDGSTLib.demo.phantom import generate_phantom
from LymphNodeDGSTLib.engine.segmentation.backends.reference import CALIBRATION, ReferenceCase
from LymphNodeDGSTLib.home import Home

PHANTOMS = (("A", 0), ("B", 0))
MAX_LIBRARY_CASES = 4
LIBRARY_MARGIN_MM = 30.0


def reference_cases(version_path: Path, purpose: str) -> list[ReferenceCase]:
    library = library_cases(version_path)
    if purpose == CALIBRATION and library:
        return library
    return phantom_cases() + library


def phantom_cases() -> list[ReferenceCase]:
    cases = []
    for site, seed in PHANTOMS:
        image = generate_phantom(site, seed).image
        cases.append(as_case(f"phantom-{site}{seed}", image))
    return cases


def home_of(version_path: Path) -> Home | None:
    store_root = Path(version_path).parents[2]
    home = Home(store_root.parent)
    return home if home.models == store_root else None


def library_cases(version_path: Path, limit: int = MAX_LIBRARY_CASES) -> list[ReferenceCase]:
    home = home_of(version_path)
    if home is None:
        return []
    records, _ = CaseLibrary(home.cases).survey()
    cases = []
    for record in records[-limit:] if limit else []:
        try:
            image = sitk.ReadImage(str(record.image_path))
            label = sitk.ReadImage(str(record.label_path))
        except RuntimeError:
            continue
        cases.append(as_case(f"case-{record.id}", around_label(image, label)))
    return cases


def around_label(image: sitk.Image, label: sitk.Image, margin_mm: float = LIBRARY_MARGIN_MM) -> sitk.Image:
    """`image` cut to the box of `label`'s voxels plus a margin; the whole image when empty."""
    mask = sitk.GetArrayViewFromImage(label) > 0
    if not mask.any():
        return image
    spacing_zyx = np.array(image.GetSpacing()[::-1])
    margin = np.ceil(margin_mm / spacing_zyx).astype(int)
    where = np.nonzero(mask)
    low = np.maximum([w.min() for w in where] - margin, 0)
    high = np.minimum([w.max() + 1 for w in where] + margin, mask.shape)
    start_xyz = [int(v) for v in low[::-1]]
    size_xyz = [int(v) for v in (high - low)[::-1]]
    return sitk.RegionOfInterest(image, size_xyz, start_xyz)


def as_case(name: str, image: sitk.Image) -> ReferenceCase:
    return ReferenceCase(name, sitk.GetArrayFromImage(image), tuple(image.GetSpacing()[::-1]))
