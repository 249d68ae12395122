"""Where a 3D image lies in space, in the LPS convention of SimpleITK (and ITK's file readers).

Arrays everywhere in the core are indexed `[z, y, x]` (numpy order, as `sitk.GetArrayFromImage`
returns them); an `ImageGeometry` plus such an array is exactly a SimpleITK image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from LymphNodeDGSTLib.errors import UserInputError


@dataclass(frozen=True)
class ImageGeometry:
    """Spacing (mm, along i j k), origin (LPS mm, centre of voxel 0,0,0) and direction.

    `direction` is the 3x3 matrix flattened row by row, as SimpleITK stores it: column c is the
    LPS unit vector of image axis c (i, j, k).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, float, float, float, float, float, float, float, float]

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError(
                f"ImageGeometry needs 3 spacings, 3 origin values and 9 direction values, got "
                f"{len(self.spacing)}, {len(self.origin)} and {len(self.direction)}"
            )
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction as a 3x3 array (columns are the i, j, k axes in LPS)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> ImageGeometry:
        """The geometry of a 3D SimpleITK image."""
        if image.GetDimension() != 3:
            raise UserInputError(f"expected a 3D image, got a {image.GetDimension()}D one")
        return cls(image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def to_sitk(self, array_zyx: np.ndarray) -> sitk.Image:
        """A SimpleITK image holding a copy of `array_zyx` (indexed [z, y, x]) on this geometry."""
        array_zyx = np.asarray(array_zyx)
        if array_zyx.ndim != 3:
            raise ValueError(f"expected a 3D array indexed [z, y, x], got shape {array_zyx.shape}")
        if array_zyx.dtype == np.bool_:
            array_zyx = array_zyx.astype(np.uint8)
        image = sitk.GetImageFromArray(array_zyx, isVector=False)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> None:
        """Set this geometry on an existing 3D SimpleITK image (in place)."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def isclose(self, other: ImageGeometry, atol: float = 1e-6) -> bool:
        """Whether every spacing, origin and direction value agrees within `atol`."""
        return all(
            np.allclose(mine, theirs, rtol=0.0, atol=atol)
            for mine, theirs in (
                (self.spacing, other.spacing),
                (self.origin, other.origin),
                (self.direction, other.direction),
            )
        )
