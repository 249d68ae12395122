"""The neck a phantom is drawn in: its grid, the anatomy (skin, fat, muscles, vessels, airway,
bones, thyroid) and the scan (HU per tissue, blur of the site's kernel, noise).
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from LymphNodeDGSTLib.demo.phantom.sites import SiteProfile, Tissue


HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT scanner stores

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
