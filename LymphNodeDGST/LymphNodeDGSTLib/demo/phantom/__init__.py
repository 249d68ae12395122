"""Synthetic neck CT phantoms with exact lymph-node labels, in the styles of two imaging sites.

A phantom is a small neck-like CT volume: body outline with skin and fat, muscles, cervical spine,
airway, thyroid, oesophagus, carotid arteries and jugular veins, and a few lymph nodes (ellipsoids
in the fat along the jugular chain and in the posterior triangle). Anatomy is drawn on a grid that
is finer along z than the output, then the scanner is simulated: partial volume (averaging fine
slices to the slice thickness), reconstruction-kernel blur, noise that went through the same
kernel, and a HU calibration offset.

A site profile (`SITE_PROFILES`) fixes how one hospital scans; the patient (anatomy, node count,
sizes, positions) comes from the seed. The label is exact: a voxel is a node voxel when its centre
lies inside a node ellipsoid (necrotic centre included). Synthetic, not clinical.

Coordinates are physical LPS millimetres as SimpleITK uses them (x to the patient's left, y to
posterior, z to superior), identity direction, volume centred near the origin. Arrays are (z, y, x).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.errors import UserInputError
from LymphNodeDGSTLib.demo.phantom.sites import NODE_TISSUES, SITE_PROFILES, SiteProfile, site_profile
from LymphNodeDGSTLib.demo.phantom.anatomy import _Grid, _NeckAnatomy, _scan, _tissue_hu
from LymphNodeDGSTLib.demo.phantom.nodes import NodeTruth, _place_nodes

MANIFEST_NAME = "phantoms.json"



@dataclass
class Phantom:
    """A synthetic CT, its exact lymph-node label and the truth it was drawn from."""

    image: sitk.Image  # int16 HU
    label: sitk.Image  # uint8, 1 = lymph node
    nodes: list[NodeTruth]
    site: str
    seed: int
    tissues: sitk.Image = field(repr=False)  # uint8 `Tissue` class at each voxel centre

    @property
    def profile(self) -> SiteProfile:
        return SITE_PROFILES[self.site]


def generate_phantom(site: str, seed: int) -> Phantom:
    """Draw one phantom; the same (site, seed) always gives the same phantom."""
    profile = site_profile(site)
    seed = _checked_seed(seed)
    rng = np.random.default_rng([seed, *site.encode()])
    grid = _Grid(profile)
    anatomy = _NeckAnatomy.sample(rng)
    tissue = anatomy.draw(grid)
    hu_of_tissue = _tissue_hu(rng, profile)
    placed = _place_nodes(rng, profile, grid, anatomy, tissue)

    hu = hu_of_tissue[tissue]
    for node in placed:
        hu[node.fine_region][node.fine_mask] = node.truth.hu
        if node.truth.necrotic:
            hu[node.fine_region][node.fine_core] = node.truth.necrosis_hu
    image = _scan(rng, profile, grid, hu)

    tissues_out = tissue[grid.k // 2 :: grid.k]
    label = np.isin(tissues_out, NODE_TISSUES).astype(np.uint8)
    return Phantom(
        image=grid.to_image(image),
        label=grid.to_image(label),
        nodes=[node.truth for node in placed],
        site=site,
        seed=seed,
        tissues=grid.to_image(tissues_out),
    )


def write_phantoms(out_dir: str | os.PathLike, site: str, n: int, seed: int) -> list[tuple[Path, Path]]:
    """Write phantoms `seed .. seed+n-1` of a site as NIfTI pairs and update `phantoms.json`.

    Files are `site{S}_s{seed:04d}_ct.nii.gz` and `..._label.nii.gz`; each file is written to a
    hidden temporary name and renamed, so an interrupted run leaves no half-written file. The
    manifest lists every phantom in the folder (entries of earlier runs are kept).
    """
    site_profile(site)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserInputError(f"number of phantoms must be an integer >= 1, got {n!r}")
    seed = _checked_seed(seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"phantom output path {out} exists and is not a folder")
    manifest_path = out / MANIFEST_NAME
    entries = _read_manifest_entries(manifest_path)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):  # SimpleITK would fail late, with noise on stderr
        raise UserInputError(f"phantom output folder {out} is not writable (read-only file "
                             "system or no permission); choose another folder")

    written: list[tuple[Path, Path]] = []
    for case_seed in range(seed, seed + n):
        phantom = generate_phantom(site, case_seed)
        stem = f"site{site}_s{case_seed:04d}"
        image_path, label_path = out / f"{stem}_ct.nii.gz", out / f"{stem}_label.nii.gz"
        _write_atomically(image_path, lambda tmp: sitk.WriteImage(phantom.image, str(tmp), True))
        _write_atomically(label_path, lambda tmp: sitk.WriteImage(phantom.label, str(tmp), True))
        written.append((image_path, label_path))
        entries = [e for e in entries if e.get("image") != image_path.name]
        entries.append({
            "site": site,
            "seed": case_seed,
            "image": image_path.name,
            "label": label_path.name,
            "nodes": [node.to_dict() for node in phantom.nodes],
        })

    entries.sort(key=lambda e: (str(e.get("site")), int(e.get("seed", 0))))
    manifest = {
        "synthetic": True,
        "generator": "LymphNodeDGSTLib.demo.phantom",
        "coordinates": "physical LPS mm (SimpleITK), identity direction",
        "profiles": {name: asdict(p) for name, p in SITE_PROFILES.items()},
        "phantoms": entries,
    }
    text = json.dumps(manifest, indent=1)
    _write_atomically(manifest_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return written


# --- grid and scanner -------------------------------------------------------------------------


# --- anatomy ----------------------------------------------------------------------------------


# --- lymph nodes ------------------------------------------------------------------------------


# --- files ------------------------------------------------------------------------------------


def _checked_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserInputError(f"phantom seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _read_manifest_entries(path: Path) -> list[dict]:
    """Entries of an existing manifest, so a second run adds to it; UserInputError if unreadable."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["phantoms"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError("phantoms is not a list of objects")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"{path} exists but is not a phantom manifest ({error}); "
                             "choose another output folder") from None
    return entries


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a hidden temporary file in the same folder, then rename it into place."""
    suffix = "".join(path.suffixes)  # keeps .nii.gz so SimpleITK picks the NIfTI writer
    tmp = path.with_name(f".{path.name.removesuffix(suffix)}.{uuid.uuid4().hex}.partial{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
