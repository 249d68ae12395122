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
from enum import IntEnum
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from LymphNodeDGSTLib.errors import UserInputError

MANIFEST_NAME = "phantoms.json"

HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT scanner stores

NODE_MARGIN_MM = 1.5  # least distance from a node to any tissue other than fat
NODE_PLACEMENT_TRIES_PER_NODE = 80
JUGULAR_CHAIN_SHARE = 0.7  # the rest go to the posterior triangle (level V)
NECROSIS_MIN_LONG_AXIS_MM = 10.0  # smaller nodes are drawn without a necrotic centre


class Tissue(IntEnum):
    """Tissue classes of the phantom's tissue map (one per voxel)."""

    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    CORTICAL_BONE = 4
    CANCELLOUS_BONE = 5
    DISC = 6
    SPINAL_CANAL = 7
    AIRWAY_WALL = 8
    AIRWAY = 9
    ESOPHAGUS = 10
    THYROID = 11
    ARTERY = 12
    VEIN = 13
    NODE = 14
    NECROSIS = 15


BONE_TISSUES = (Tissue.CORTICAL_BONE, Tissue.CANCELLOUS_BONE)
VESSEL_TISSUES = (Tissue.ARTERY, Tissue.VEIN)
NODE_TISSUES = (Tissue.NODE, Tissue.NECROSIS)


@dataclass(frozen=True)
class SiteProfile:
    """How one imaging site scans a neck: grid, contrast protocol, scanner, and its node population.

    All intensities are HU before `hu_offset`; ranges are (low, high) and drawn uniformly
    (node long axes log-uniformly, so small nodes are commoner than large ones).
    """

    name: str
    description: str
    shape_xyz: tuple[int, int, int]  # voxels along x, y, z
    spacing_xy_mm: float  # in-plane pixel size
    slice_thickness_mm: float  # z spacing; slices are contiguous, thickness = spacing
    z_supersampling: int  # odd: fine slices averaged into one output slice (partial volume)
    kernel_sigma_mm: float  # in-plane Gaussian blur of the reconstruction kernel (smaller = sharper)
    noise_std_hu: float  # standard deviation of the image noise, after the kernel
    hu_offset: float  # calibration offset added to every voxel
    contrast_enhanced: bool  # whether an iodinated contrast agent is in the blood
    artery_hu: float
    vein_hu: float
    muscle_hu: float
    thyroid_hu: float
    node_count_range: tuple[int, int]
    node_long_axis_range_mm: tuple[float, float]
    node_short_to_long_ratio_range: tuple[float, float]
    node_hu_range: tuple[float, float]
    necrosis_probability: float  # chance that a node of >= 10 mm has a necrotic centre
    necrosis_hu_range: tuple[float, float]
    necrosis_scale_range: tuple[float, float] = (0.4, 0.65)  # centre = node ellipsoid x this

    def __post_init__(self) -> None:
        if self.z_supersampling < 1 or self.z_supersampling % 2 == 0:
            raise ValueError("z_supersampling must be a positive odd number")
        for name in ("node_count_range", "node_long_axis_range_mm", "node_hu_range",
                     "necrosis_hu_range", "node_short_to_long_ratio_range", "necrosis_scale_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: low {low} > high {high}")

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing (x, y, z) in mm."""
        return (self.spacing_xy_mm, self.spacing_xy_mm, self.slice_thickness_mm)

    @property
    def size_mm(self) -> tuple[float, float, float]:
        """Field of view (x, y, z) in mm."""
        return tuple(n * s for n, s in zip(self.shape_xyz, self.spacing_mm))


SITE_PROFILES: dict[str, SiteProfile] = {
    "A": SiteProfile(
        name="A",
        description="non-contrast neck CT, 3 mm slices, smooth kernel, low noise; small nodes",
        shape_xyz=(128, 128, 32),
        spacing_xy_mm=1.2,
        slice_thickness_mm=3.0,
        z_supersampling=3,
        kernel_sigma_mm=0.8,
        noise_std_hu=8.0,
        hu_offset=0.0,
        contrast_enhanced=False,
        artery_hu=42.0,
        vein_hu=40.0,
        muscle_hu=50.0,
        thyroid_hu=90.0,
        node_count_range=(3, 10),
        node_long_axis_range_mm=(4.0, 15.0),
        node_short_to_long_ratio_range=(0.5, 0.9),
        node_hu_range=(20.0, 45.0),
        necrosis_probability=0.0,
        necrosis_hu_range=(0.0, 20.0),
    ),
    "B": SiteProfile(
        name="B",
        description="contrast-enhanced neck CT, 1.25 mm slices, sharp kernel, more noise, "
        "+15 HU calibration offset; larger nodes, some necrotic",
        shape_xyz=(128, 128, 80),
        spacing_xy_mm=1.1,
        slice_thickness_mm=1.25,
        z_supersampling=1,
        kernel_sigma_mm=0.35,
        noise_std_hu=18.0,
        hu_offset=15.0,
        contrast_enhanced=True,
        artery_hu=260.0,
        vein_hu=180.0,
        muscle_hu=60.0,
        thyroid_hu=160.0,
        node_count_range=(3, 15),
        node_long_axis_range_mm=(8.0, 30.0),
        node_short_to_long_ratio_range=(0.5, 0.9),
        node_hu_range=(35.0, 60.0),
        necrosis_probability=0.35,
        necrosis_hu_range=(0.0, 20.0),
    ),
    # The harder shift (issue 15): site B's scanner, but nodes whose pattern no per-channel affine
    # of the features can map onto site A's: every node is rim-enhancing (a bright wall above
    # muscle HU around a fluid centre), so node-vs-muscle contrast is inverted and a solid blob
    # becomes a ring; nodes are also flatter (short/long 0.3-0.5).
    "C": SiteProfile(
        name="C",
        description="site B's contrast-enhanced scanner; every node rim-enhancing (bright wall "
        "120-160 HU around a 5-20 HU fluid centre), flat nodes",
        shape_xyz=(128, 128, 80),
        spacing_xy_mm=1.1,
        slice_thickness_mm=1.25,
        z_supersampling=1,
        kernel_sigma_mm=0.35,
        noise_std_hu=18.0,
        hu_offset=15.0,
        contrast_enhanced=True,
        artery_hu=260.0,
        vein_hu=180.0,
        muscle_hu=60.0,
        thyroid_hu=160.0,
        node_count_range=(3, 12),
        node_long_axis_range_mm=(10.0, 30.0),
        node_short_to_long_ratio_range=(0.3, 0.5),
        node_hu_range=(120.0, 160.0),
        necrosis_probability=1.0,
        necrosis_hu_range=(5.0, 20.0),
        necrosis_scale_range=(0.6, 0.8),
    ),
}


@dataclass
class NodeTruth:
    """One lymph node as drawn: an ellipsoid in physical LPS mm."""

    center_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]  # longest first
    axes: tuple[tuple[float, float, float], ...]  # unit direction of each semi-axis, in LPS
    necrotic: bool
    necrosis_scale: float  # necrotic centre = the node ellipsoid scaled by this (0 if none)
    hu: float  # node HU before scanner effects (necrotic centre: `necrosis_hu`)
    necrosis_hu: float
    level: str  # "jugular" (levels II-IV) or "posterior" (level V)
    label_voxels: int  # voxels of the output label that belong to this node

    @property
    def long_axis_mm(self) -> float:
        return 2.0 * self.semi_axes_mm[0]

    @property
    def short_axis_mm(self) -> float:
        return 2.0 * self.semi_axes_mm[2]

    def contains(self, points_mm: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Whether each LPS point (..., 3) lies inside the ellipsoid (optionally scaled)."""
        local = (np.asarray(points_mm, dtype=float) - self.center_mm) @ np.asarray(self.axes).T
        return np.sum((local / (np.asarray(self.semi_axes_mm) * scale)) ** 2, axis=-1) <= 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "long_axis_mm": self.long_axis_mm, "short_axis_mm": self.short_axis_mm}


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


def site_profile(site: str) -> SiteProfile:
    """The profile of a known site; UserInputError naming the known sites otherwise."""
    try:
        return SITE_PROFILES[site]
    except (KeyError, TypeError):
        known = ", ".join(sorted(SITE_PROFILES))
        raise UserInputError(f"unknown phantom site {site!r}; known sites: {known}") from None


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


class _Grid:
    """Output grid of a profile and the z-supersampled grid the anatomy is drawn on."""

    def __init__(self, profile: SiteProfile) -> None:
        nx, ny, nz = profile.shape_xyz
        self.spacing = profile.spacing_mm
        self.k = profile.z_supersampling
        self.origin = tuple(-(n - 1) / 2.0 * s for n, s in zip(profile.shape_xyz, self.spacing))
        self.x = (self.origin[0] + np.arange(nx) * self.spacing[0]).astype(np.float32)
        self.y = (self.origin[1] + np.arange(ny) * self.spacing[1]).astype(np.float32)
        self.z = self.origin[2] + np.arange(nz) * self.spacing[2]
        self.fine_dz = self.spacing[2] / self.k
        offsets = (np.arange(self.k) - self.k // 2) * self.fine_dz
        self.z_fine = (self.z[:, None] + offsets[None, :]).ravel().astype(np.float32)
        self.fine_spacing_zyx = (self.fine_dz, self.spacing[1], self.spacing[0])

    @property
    def fine_shape(self) -> tuple[int, int, int]:
        return (self.z_fine.size, self.y.size, self.x.size)

    def to_image(self, array: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        return image

    def snap(self, point_xyz: np.ndarray) -> np.ndarray:
        """The output voxel centre nearest a point (so every node holds at least one label voxel)."""
        index = np.rint((point_xyz - self.origin) / self.spacing)
        return self.origin + index * np.asarray(self.spacing)


def _scan(rng: np.random.Generator, profile: SiteProfile, grid: _Grid, hu_fine: np.ndarray) -> np.ndarray:
    """Partial volume, kernel blur, kernel-filtered noise, offset; int16 HU on the output grid."""
    nz = grid.z.size
    image = hu_fine.reshape(nz, grid.k, *hu_fine.shape[1:]).mean(axis=1, dtype=np.float32)
    sigma_px = profile.kernel_sigma_mm / profile.spacing_xy_mm
    image = ndimage.gaussian_filter(image, sigma=(0.0, sigma_px, sigma_px))
    noise = ndimage.gaussian_filter(rng.standard_normal(image.shape, dtype=np.float32),
                                    sigma=(0.0, sigma_px, sigma_px))
    image += noise * np.float32(profile.noise_std_hu / float(noise.std()))
    image += np.float32(profile.hu_offset)
    return np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)


def _tissue_hu(rng: np.random.Generator, profile: SiteProfile) -> np.ndarray:
    """HU of each tissue class for this patient (small per-patient variation around the norms)."""
    u = rng.uniform
    hu = np.zeros(len(Tissue), dtype=np.float32)
    hu[Tissue.AIR] = -1000.0
    hu[Tissue.SKIN] = u(20, 40)
    hu[Tissue.FAT] = u(-110, -85)
    hu[Tissue.MUSCLE] = profile.muscle_hu + u(-5, 5)
    hu[Tissue.CORTICAL_BONE] = u(800, 1100)
    hu[Tissue.CANCELLOUS_BONE] = u(200, 300)
    hu[Tissue.DISC] = u(70, 100)
    hu[Tissue.SPINAL_CANAL] = u(20, 40)
    hu[Tissue.AIRWAY_WALL] = u(100, 200)  # partly calcified cartilage
    hu[Tissue.AIRWAY] = u(-1000, -980)
    hu[Tissue.ESOPHAGUS] = profile.muscle_hu - 10 + u(-5, 5)
    hu[Tissue.THYROID] = profile.thyroid_hu + u(-10, 10)
    hu[Tissue.ARTERY] = profile.artery_hu * u(0.9, 1.1)
    hu[Tissue.VEIN] = profile.vein_hu * u(0.9, 1.1)
    hu[Tissue.NODE] = np.mean(profile.node_hu_range)  # each node overrides with its own HU
    hu[Tissue.NECROSIS] = np.mean(profile.necrosis_hu_range)
    return hu


# --- anatomy ----------------------------------------------------------------------------------


def _ellipse(x: np.ndarray, y: np.ndarray, cx, cy, a, b, angle=0.0) -> np.ndarray:
    """Inside a (rotated) ellipse; centre, semi-axes and angle may vary along z (shape (Z, 1, 1))."""
    dx, dy = x - cx, y - cy
    if np.all(np.asarray(angle) == 0):
        u, v = dx, dy
    else:
        c, s = np.cos(angle), np.sin(angle)
        u, v = dx * c + dy * s, dy * c - dx * s
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class _NeckAnatomy:
    """One patient's neck as a handful of numbers; `draw` paints it, slice by slice, along z."""

    body_a: float  # lateral semi-axis at mid neck
    body_b: float  # anteroposterior semi-axis
    body_cy: float
    body_wobble: float
    body_wobble_phase: float
    skin: float
    subcutaneous_fat: float
    scm_angle_deg: float  # sternocleidomastoid: angle from anterior around the body outline
    scm_a: float
    scm_b: float
    trapezius_angle_deg: float
    vertebra_cy: float
    vertebra_a: float
    vertebra_b: float
    lordosis: float
    cortex: float
    disc_period: float
    disc_height: float
    disc_phase: float
    canal_r: float
    spinous_b: float
    paraspinal_dx: float
    paraspinal_a: float
    paraspinal_b: float
    airway_cy: float
    trachea_a: float
    trachea_b: float
    larynx_a: float
    larynx_b: float
    larynx_z: float
    airway_wall: float
    thyroid_z: float
    thyroid_half_height: float
    carotid_x: float
    carotid_y: float
    carotid_r: float
    bifurcation_z: float
    jugular_dx: float
    jugular_dy: float
    jugular_a: float
    jugular_b: float
    jugular_scale: tuple[float, float]  # right (x < 0), left (x > 0): the right is usually larger

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "_NeckAnatomy":
        u = rng.uniform
        return cls(
            body_a=u(50, 57), body_b=u(44, 50), body_cy=u(-2, 2), body_wobble=u(0, 1.5),
            body_wobble_phase=u(0, 2 * np.pi), skin=u(1.5, 2.5), subcutaneous_fat=u(3, 7),
            scm_angle_deg=u(50, 62), scm_a=u(12, 16), scm_b=u(3.5, 5.5), trapezius_angle_deg=u(135, 150),
            vertebra_cy=u(12, 15), vertebra_a=u(8.5, 10.5), vertebra_b=u(7, 8.5), lordosis=u(1, 3),
            cortex=u(1.3, 1.8), disc_period=u(17, 20), disc_height=u(4, 6), disc_phase=u(0, 20),
            canal_r=u(6, 7.5), spinous_b=u(5, 7), paraspinal_dx=u(14, 17), paraspinal_a=u(11, 14),
            paraspinal_b=u(8, 10), airway_cy=u(-26, -22), trachea_a=u(7, 9), trachea_b=u(6, 7.5),
            larynx_a=u(10, 12.5), larynx_b=u(8, 10), larynx_z=u(5, 25), airway_wall=u(1.5, 2.5),
            thyroid_z=u(-40, -25), thyroid_half_height=u(15, 22), carotid_x=u(20, 23),
            carotid_y=u(-11, -7), carotid_r=u(3.5, 4.5), bifurcation_z=u(10, 30), jugular_dx=u(9, 11),
            jugular_dy=u(1, 4), jugular_a=u(5, 6.5), jugular_b=u(3.5, 4.5),
            jugular_scale=(u(0.9, 1.15), u(0.8, 1.05)),
        )

    # Per-z geometry (z in mm, any shape); t = z / 50 runs -1 (inferior) .. 1 (superior).
    def body_axes(self, z):
        t = z / 50.0
        wobble = self.body_wobble * np.sin(2 * np.pi * z / 40.0 + self.body_wobble_phase)
        return self.body_a * (1 - 0.08 * t) + wobble, self.body_b * (1 - 0.05 * t)

    def vertebra_y(self, z):
        t = np.clip(z / 50.0, -1.2, 1.2)
        return self.vertebra_cy - self.lordosis * (1 - t * t)

    def is_disc(self, z):
        return np.mod(z - self.disc_phase, self.disc_period) < self.disc_height

    def airway_axes(self, z):
        s = _smoothstep((z - self.larynx_z) / 12.0 + 0.5)
        return (self.trachea_a + (self.larynx_a - self.trachea_a) * s,
                self.trachea_b + (self.larynx_b - self.trachea_b) * s)

    def carotid_x_at(self, z):
        return self.carotid_x + 0.04 * z

    def jugular(self, z, side: int):
        """Centre x, centre y, semi-axes (a, b) of the internal jugular vein on one side."""
        scale = self.jugular_scale[0 if side < 0 else 1]
        cx = side * (self.carotid_x_at(z) + self.jugular_dx)
        cy = self.carotid_y + self.jugular_dy + 0.03 * z
        return cx, cy, self.jugular_a * scale, self.jugular_b * scale

    def _surface_muscle(self, z, side: int, angle_deg, depth, a, b):
        """Centre and angle of a muscle lying along the body outline (angle from anterior)."""
        ax, ay = self.body_axes(z)
        phi = np.deg2rad(angle_deg)
        px, py = ax * np.sin(phi), self.body_cy - ay * np.cos(phi)
        nx, ny = np.sin(phi) / ax, -np.cos(phi) / ay  # outward normal of the outline
        norm = np.hypot(nx, ny)
        cx, cy = px - depth * nx / norm, py - depth * ny / norm
        tangent = np.arctan2(ay * np.sin(phi), ax * np.cos(phi))
        return side * cx, cy, side * tangent

    def draw(self, grid: _Grid) -> np.ndarray:
        """Tissue classes on the fine grid, (z, y, x) uint8."""
        x = grid.x[None, None, :]
        y = grid.y[None, :, None]
        z = grid.z_fine[:, None, None]
        tissue = np.zeros(grid.fine_shape, dtype=np.uint8)

        ax, ay = self.body_axes(z)
        tissue[_ellipse(x, y, 0.0, self.body_cy, ax, ay)] = Tissue.SKIN
        inner = _ellipse(x, y, 0.0, self.body_cy, ax - self.skin, ay - self.skin)
        tissue[inner] = Tissue.FAT

        def paint(mask: np.ndarray, cls: Tissue) -> None:
            tissue[mask & inner] = cls

        fat_depth = self.skin + self.subcutaneous_fat
        t = z / 50.0
        vy = self.vertebra_y(z)
        disc = self.is_disc(z)
        bone_level = ~disc
        canal_cy = vy + self.vertebra_b + 1.5 + self.canal_r
        aw_a, aw_b = self.airway_axes(z)
        for side in (-1, 1):
            # sternocleidomastoid moves anteromedially towards the sternum (inferiorly)
            cx, cy, ang = self._surface_muscle(z, side, self.scm_angle_deg + 8 * t,
                                               fat_depth + self.scm_b, self.scm_a, self.scm_b)
            paint(_ellipse(x, y, cx, cy, self.scm_a, self.scm_b, ang), Tissue.MUSCLE)
            cx, cy, ang = self._surface_muscle(z, side, self.trapezius_angle_deg, fat_depth + 3.0, 16.0, 3.0)
            paint(_ellipse(x, y, cx, cy, 16.0, 3.0, ang), Tissue.MUSCLE)
            paint(_ellipse(x, y, side * self.paraspinal_dx, canal_cy + 9.0,
                           self.paraspinal_a, self.paraspinal_b, side * 0.3), Tissue.MUSCLE)
            paint(_ellipse(x, y, side * 6.0, vy - self.vertebra_b - 2.0, 3.5, 2.5), Tissue.MUSCLE)  # longus colli
            paint(_ellipse(x, y, side * 7.0, self.airway_cy - aw_b - self.airway_wall - 6.0, 6.5, 2.2),
                  Tissue.MUSCLE)  # strap muscles

        # thyroid: two lobes beside the trachea and an isthmus in front, lens-shaped along z
        thyroid_scale = np.sqrt(np.clip(1 - ((z - self.thyroid_z) / self.thyroid_half_height) ** 2, 0, 1))
        present = thyroid_scale > 0.05
        thyroid_scale = np.maximum(thyroid_scale, 0.05)
        for side in (-1, 1):
            lobe = _ellipse(x, y, side * (aw_a + self.airway_wall + 5.5), self.airway_cy + 2.0,
                            5.5 * thyroid_scale, 9.0 * thyroid_scale, side * 0.35)
            paint(lobe & present, Tissue.THYROID)
        isthmus = _ellipse(x, y, 0.0, self.airway_cy - aw_b - self.airway_wall - 1.5, 9.0, 2.0 * thyroid_scale)
        paint(isthmus & present & (np.abs(z - self.thyroid_z) < 0.4 * self.thyroid_half_height), Tissue.THYROID)

        esophagus_cy = (self.airway_cy + aw_b + self.airway_wall + vy - self.vertebra_b - 4.5) / 2.0
        paint(_ellipse(x, y, -1.0, esophagus_cy, 7.0, 3.0), Tissue.ESOPHAGUS)
        paint(_ellipse(x, y, 0.0, self.airway_cy, aw_a + self.airway_wall, aw_b + self.airway_wall),
              Tissue.AIRWAY_WALL)
        paint(_ellipse(x, y, 0.0, self.airway_cy, aw_a, aw_b), Tissue.AIRWAY)

        # cervical spine: vertebral bodies (cortical shell, cancellous core) with discs between
        body = _ellipse(x, y, 0.0, vy, self.vertebra_a, self.vertebra_b)
        core = _ellipse(x, y, 0.0, vy, self.vertebra_a - self.cortex, self.vertebra_b - self.cortex)
        paint(body & disc, Tissue.DISC)
        paint(body & bone_level, Tissue.CORTICAL_BONE)
        paint(core & bone_level, Tissue.CANCELLOUS_BONE)
        for side in (-1, 1):  # transverse processes
            paint(_ellipse(x, y, side * (self.vertebra_a + 5.0), vy + 3.0, 5.5, 3.0) & bone_level,
                  Tissue.CORTICAL_BONE)
        paint(_ellipse(x, y, 0.0, canal_cy, self.canal_r + 2.5, self.canal_r + 2.5) & bone_level,
              Tissue.CORTICAL_BONE)  # pedicles and laminae
        paint(_ellipse(x, y, 0.0, canal_cy + self.canal_r + 1.5 + self.spinous_b, 2.5, self.spinous_b)
              & bone_level, Tissue.CORTICAL_BONE)
        paint(_ellipse(x, y, 0.0, canal_cy, self.canal_r, self.canal_r), Tissue.SPINAL_CANAL)

        # vessels: vertebral arteries in the transverse foramina, carotids, internal jugular veins
        for side in (-1, 1):
            paint(_ellipse(x, y, side * (self.vertebra_a + 5.0), vy + 3.0, 2.0, 2.0), Tissue.ARTERY)
            cx, r = side * self.carotid_x_at(z), self.carotid_r
            split = np.clip((z - self.bifurcation_z) / 15.0, 0.0, 1.0)  # 0 below the bifurcation
            below = z <= self.bifurcation_z
            paint(_ellipse(x, y, cx, self.carotid_y, r, r) & below, Tissue.ARTERY)
            internal = _ellipse(x, y, cx + side * 3.0 * split, self.carotid_y + 4.0 * split, 0.85 * r, 0.85 * r)
            external = _ellipse(x, y, cx - side * 2.0 * split, self.carotid_y - 5.0 * split, 0.65 * r, 0.65 * r)
            paint((internal | external) & ~below, Tissue.ARTERY)
            jx, jy, ja, jb = self.jugular(z, side)
            paint(_ellipse(x, y, jx, jy, ja, jb, side * 0.4), Tissue.VEIN)
        return tissue


# --- lymph nodes ------------------------------------------------------------------------------


@dataclass
class _PlacedNode:
    truth: NodeTruth
    fine_region: tuple[slice, slice, slice]  # (z, y, x) box of the fine grid holding the node
    fine_mask: np.ndarray
    fine_core: np.ndarray


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation; rows are the node's axis directions."""
    quaternion = rng.standard_normal(4)
    return Rotation.from_quat(quaternion / np.linalg.norm(quaternion)).as_matrix().T


def _support(axes: np.ndarray, semi: np.ndarray, direction: np.ndarray) -> float:
    """Half-width of an ellipsoid along a unit direction."""
    return float(np.sqrt(np.sum((semi * (axes @ direction)) ** 2)))


def _place_nodes(rng: np.random.Generator, profile: SiteProfile, grid: _Grid, anatomy: _NeckAnatomy,
                 tissue: np.ndarray) -> list[_PlacedNode]:
    """Put nodes into the fat of the jugular chain and posterior triangle; paints them into `tissue`.

    A candidate is kept only if the node stays at least NODE_MARGIN_MM from every non-fat tissue
    (so clear of spine, airway, vessels, muscles, skin and other nodes), lies wholly in the volume,
    and its label is not 26-connected to another node's label.
    """
    low, high = profile.node_count_range
    target = int(rng.integers(low, high + 1))
    near_nodes = np.zeros((grid.z.size, grid.y.size, grid.x.size), dtype=bool)  # labels, 26-dilated
    placed: list[_PlacedNode] = []
    for _ in range(NODE_PLACEMENT_TRIES_PER_NODE * target):
        if len(placed) == target:
            break
        node = _try_node(rng, profile, grid, anatomy, tissue, near_nodes)
        if node is not None:
            placed.append(node)
    if len(placed) < low:  # the anatomy always has room; reaching this is a bug, not bad input
        raise RuntimeError(f"placed only {len(placed)} of at least {low} nodes")
    return placed


def _try_node(rng: np.random.Generator, profile: SiteProfile, grid: _Grid, anatomy: _NeckAnatomy,
              tissue: np.ndarray, near_nodes: np.ndarray) -> _PlacedNode | None:
    """One random candidate node, placed and painted into `tissue`; None if it does not fit."""
    lo, hi = profile.node_long_axis_range_mm
    long_axis = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    ratios = np.sort(rng.uniform(*profile.node_short_to_long_ratio_range, size=2))[::-1]
    semi = 0.5 * long_axis * np.array([1.0, ratios[0], ratios[1]])
    axes = _random_rotation(rng)
    side = int(rng.choice((-1, 1)))
    z = rng.uniform(grid.z[0], grid.z[-1])

    if rng.uniform() < JUGULAR_CHAIN_SHARE:
        level = "jugular"
        jx, jy, ja, jb = anatomy.jugular(z, side)
        theta = np.deg2rad(rng.uniform(-80, 130))  # 0 = lateral, 90 = posterior; never medial
        direction = np.array([side * np.cos(theta), np.sin(theta), 0.0])
        vein_reach = float(np.hypot(ja * np.cos(theta), jb * np.sin(theta)))
        distance = vein_reach + _support(axes, semi, direction) + NODE_MARGIN_MM + rng.uniform(0.5, 8.0)
        center = np.array([jx, jy, z]) + distance * direction
    else:
        level = "posterior"
        ax, ay = anatomy.body_axes(z)
        center = np.array([side * rng.uniform(0.45, 0.8) * ax,
                           anatomy.body_cy + rng.uniform(0.0, 0.5) * ay, z])
    center = grid.snap(center)

    # The fine-grid box around the node, grown by the margin; it must lie in the volume.
    reach = np.sqrt(np.sum((axes.T * semi) ** 2, axis=1)) + NODE_MARGIN_MM + 1e-3  # x, y, z
    zf = grid.z_fine
    x_box = _box(grid.x, center[0] - reach[0], center[0] + reach[0])
    y_box = _box(grid.y, center[1] - reach[1], center[1] + reach[1])
    z_box = _box(zf, center[2] - reach[2], center[2] + reach[2])
    if x_box is None or y_box is None or z_box is None:
        return None
    region = (z_box, y_box, x_box)
    local_tissue = tissue[region]
    points = np.stack(np.broadcast_arrays(grid.x[x_box][None, None, :], grid.y[y_box][None, :, None],
                                          zf[z_box][:, None, None]), axis=-1)
    truth = NodeTruth(
        center_mm=tuple(float(c) for c in center), semi_axes_mm=tuple(float(s) for s in semi),
        axes=tuple(tuple(float(v) for v in row) for row in axes), necrotic=False, necrosis_scale=0.0,
        hu=float(rng.uniform(*profile.node_hu_range)), necrosis_hu=float(rng.uniform(*profile.necrosis_hu_range)),
        level=level, label_voxels=0,
    )
    mask = truth.contains(points)
    not_fat = local_tissue != Tissue.FAT
    if not_fat[mask].any():
        return None
    if not_fat.any():
        clearance = ndimage.distance_transform_edt(~not_fat, sampling=grid.fine_spacing_zyx)
        if clearance[mask].min() <= NODE_MARGIN_MM:
            return None

    # The output grid samples every k-th fine slice (the slab centres).
    k = grid.k
    first = -(-(z_box.start - k // 2) // k)  # first output slice whose centre is in the box
    out_z = slice(first, (z_box.stop - 1 - k // 2) // k + 1)
    fine_rows = np.arange(out_z.start, out_z.stop) * k + k // 2 - z_box.start
    out_mask = mask[fine_rows]
    out_region = (out_z, y_box, x_box)
    if (out_mask & near_nodes[out_region]).any():
        return None

    core = np.zeros_like(mask)
    if long_axis >= NECROSIS_MIN_LONG_AXIS_MM and rng.uniform() < profile.necrosis_probability:
        truth.necrotic = True
        truth.necrosis_scale = float(rng.uniform(*profile.necrosis_scale_range))
        core = truth.contains(points, scale=truth.necrosis_scale)
    truth.label_voxels = int(out_mask.sum())
    _dilate_into(near_nodes, out_region, out_mask)
    local_tissue[mask] = Tissue.NODE
    local_tissue[core] = Tissue.NECROSIS
    return _PlacedNode(truth=truth, fine_region=region, fine_mask=mask, fine_core=core)


def _dilate_into(target: np.ndarray, region: tuple[slice, ...], mask: np.ndarray) -> None:
    """OR the 26-neighbourhood dilation of `mask` (which sits at `region` of `target`) into `target`."""
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(region, target.shape))
    padded = np.zeros([g.stop - g.start for g in grown], dtype=bool)
    padded[tuple(slice(s.start - g.start, s.stop - g.start) for s, g in zip(region, grown))] = mask
    target[grown] |= ndimage.binary_dilation(padded, structure=np.ones((3, 3, 3), dtype=bool))


def _box(coords: np.ndarray, low: float, high: float) -> slice | None:
    """Index slice of the sorted coordinates within [low, high]; None if that leaves the grid."""
    if low < coords[0] or high > coords[-1]:
        return None
    return slice(int(np.searchsorted(coords, low, "left")), int(np.searchsorted(coords, high, "right")))


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
