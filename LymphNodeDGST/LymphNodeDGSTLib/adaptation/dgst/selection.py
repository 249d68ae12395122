"""The paper's selection: per output filter of a convolution, the `gamma` entries with the largest
score (|grad| for DGST), exactly min(gamma, filter size) per filter, ties to the lowest position.

`FilterLayout` views a convolution weight as [filters, entries]; `top_gamma_mask` chooses.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch.nn.modules.conv import _ConvNd


@dataclass(frozen=True)
class FilterLayout:
    """How a convolution weight splits into output filters (kernels).

    Conv weights are `[out, in/groups, *k]` (filter = dim 0); transposed-conv weights are
    `[in, out/groups, *k]` (filter = dim 1 within each group).
    """

    shape: torch.Size
    transposed: bool
    groups: int = 1

    @classmethod
    def of(cls, conv: _ConvNd) -> "FilterLayout":
        return cls(conv.weight.shape, bool(conv.transposed), int(conv.groups))

    @property
    def n_filters(self) -> int:
        return self.shape[1] * self.groups if self.transposed else self.shape[0]

    @property
    def filter_size(self) -> int:
        return self.shape.numel() // self.n_filters

    def to_filters(self, tensor: torch.Tensor) -> torch.Tensor:
        """`[n_filters, filter_size]`: a view for convolutions, a copy for transposed ones."""
        if not self.transposed:
            return tensor.reshape(self.n_filters, self.filter_size)
        g = self.groups
        in_per_group, out_per_group = self.shape[0] // g, self.shape[1]
        grouped = tensor.reshape(g, in_per_group, out_per_group, -1).transpose(1, 2)
        return grouped.reshape(self.n_filters, self.filter_size)

    def from_filters(self, filters: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_filters`: back to the weight's own shape."""
        if not self.transposed:
            return filters.reshape(self.shape)
        g = self.groups
        in_per_group, out_per_group = self.shape[0] // g, self.shape[1]
        grouped = filters.reshape(g, out_per_group, in_per_group, -1).transpose(1, 2)
        return grouped.reshape(self.shape)


ITERATIVE_MAX_LIMIT = 8  # up to this gamma, k row-wise max passes beat one topk


def top_gamma_mask(scores: torch.Tensor, gamma: int, overwrite_scores: bool = False) -> torch.Tensor:
    """Boolean mask of the `gamma` largest scores in every row of a 2-D tensor.

    Exactly `min(gamma, row length)` entries per row; among equal scores the lowest column index
    wins; NaN counts as larger than any finite number. O(numel), no sort and no one-hot matrix: for small
    gamma, gamma passes of a row-wise `max` (which returns the first maximal index, NaN first)
    with a scatter after each; otherwise one `topk` for the per-row threshold plus elementwise
    passes. Scores must not hold -inf. With `overwrite_scores`, `scores` is used as scratch space.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [filters, entries], got shape {tuple(scores.shape)}")
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    row_length = scores.shape[1]
    k = min(int(gamma), row_length)
    if k == row_length:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= ITERATIVE_MAX_LIMIT:
        remaining = scores if overwrite_scores else scores.clone()
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for picked in range(k):
            index = remaining.max(dim=1, keepdim=True).indices
            mask.scatter_(1, index, True)
            if picked < k - 1:
                remaining.scatter_(1, index, float("-inf"))
        return mask
    scores = scores.nan_to_num_(nan=float("inf")) if overwrite_scores \
        else scores.nan_to_num(nan=float("inf"))
    threshold = scores.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = scores > threshold
    at_threshold = scores == threshold
    still_needed = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    order_at_threshold = at_threshold.cumsum(dim=1, dtype=torch.int32)
    return above | (at_threshold & (order_at_threshold <= still_needed))
