"""Lymph nodes placed in a phantom's neck: ellipsoids in fat, away from other tissue, in the
jugular chain and the posterior triangle, some with a necrotic centre.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from LymphNodeDGSTLib.demo.phantom.anatomy import _Grid, _NeckAnatomy
from LymphNodeDGSTLib.demo.phantom.sites import SiteProfile, Tissue


NODE_MARGIN_MM = 1.5  # least distance from a node to any tissue other than fat
NODE_PLACEMENT_TRIES_PER_NODE = 80
JUGULAR_CHAIN_SHARE = 0.7  # the rest go to the posterior triangle (level V)
NECROSIS_MIN_LONG_AXIS_MM = 10.0  # smaller nodes are drawn without a necrotic centre


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
