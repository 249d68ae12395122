"""Diversity-aware ordering: do not put five near-identical scans at the top of the ranking.

Each scored CT has a small feature vector (`image_features`: the body's HU percentiles, its
extent in mm, the voxel spacing, the predicted node volume and count). Features are z-scored over
the folder. The order is greedy: the first CT is the most uncertain one; each next CT maximises

    gain = score / max_score * (FLOOR + (1 - FLOOR) * d / d_max)

where d is its feature distance to the nearest CT already placed and d_max the largest such
distance among the remaining CTs. A scan identical to one already placed keeps FLOOR (half) of
its uncertainty; a scan unlike everything placed keeps all of it. With one CT, or all features
equal, the order is by score alone.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FLOOR = 0.5


def image_features(array_zyx: np.ndarray, spacing_zyx: Sequence[float], body_slices,
                   predicted_ml: float, nodes: int) -> list[float]:
    """Cheap appearance and anatomy features of one CT (see the module docstring)."""
    region = array_zyx[body_slices] if body_slices is not None else array_zyx
    tissue = region[region > -500]
    if tissue.size == 0:
        tissue = region.ravel()
    percentiles = np.percentile(tissue, [5, 25, 50, 75, 95]).tolist()
    extent = [float(n * s) for n, s in zip(region.shape, spacing_zyx)]
    return [float(v) for v in percentiles + extent + list(spacing_zyx)] + [float(predicted_ml), float(nodes)]


def diverse_order(scores: Sequence[float], features: Sequence[Sequence[float]],
                  floor: float = FLOOR) -> list[int]:
    """Indices of `scores` in ranking order (see the module docstring)."""
    count = len(scores)
    if count == 0:
        return []
    values = np.asarray(scores, dtype=float)
    top = values.max() if values.max() > 0 else 1.0
    relative = np.clip(values / top, 0.0, None)
    matrix = np.asarray(features, dtype=float).reshape(count, -1)
    spread = matrix.std(axis=0)
    z = np.where(spread > 0, (matrix - matrix.mean(axis=0)) / np.where(spread > 0, spread, 1), 0.0)
    order = [int(np.argmax(relative))]
    nearest = np.linalg.norm(z - z[order[0]], axis=1)
    remaining = set(range(count)) - set(order)
    while remaining:
        candidates = sorted(remaining)
        d = nearest[candidates]
        scale = d.max() if d.max() > 0 else 1.0
        gain = relative[candidates] * (floor + (1 - floor) * d / scale)
        best = candidates[int(np.argmax(gain))]  # ties: the earlier index (stable)
        order.append(best)
        remaining.discard(best)
        nearest = np.minimum(nearest, np.linalg.norm(z - z[best], axis=1))
    return order
