"""The imaging sites phantoms are drawn for (A: the foundation's, B: another scanner, C: site B's
scanner with rim-enhancing nodes), and the tissues they are made of.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

from LymphNodeDGSTLib.errors import UserInputError


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


# Site C differs from site B only in its nodes: the scanner settings are written once.
SITE_B = SiteProfile(
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
)
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
    "B": SITE_B,
    # The harder shift (issue 15): site B's scanner, but nodes whose pattern no per-channel affine
    # of the features can map onto site A's: every node is rim-enhancing (a bright wall above
    # muscle HU around a fluid centre), so node-vs-muscle contrast is inverted and a solid blob
    # becomes a ring; nodes are also flatter (short/long 0.3-0.5).
    "C": replace(
        SITE_B,
        name="C",
        description="site B's contrast-enhanced scanner; every node rim-enhancing (bright wall "
        "120-160 HU around a 5-20 HU fluid centre), flat nodes",
        node_count_range=(3, 12),
        node_long_axis_range_mm=(10.0, 30.0),
        node_short_to_long_ratio_range=(0.3, 0.5),
        node_hu_range=(120.0, 160.0),
        necrosis_probability=1.0,
        necrosis_hu_range=(5.0, 20.0),
        necrosis_scale_range=(0.6, 0.8),
    ),
}


def site_profile(site: str) -> SiteProfile:
    """The profile of a known site; UserInputError naming the known sites otherwise."""
    try:
        return SITE_PROFILES[site]
    except (KeyError, TypeError):
        known = ", ".join(sorted(SITE_PROFILES))
        raise UserInputError(f"unknown phantom site {site!r}; known sites: {known}") from None
