"""How unsure the model is about one CT: uncertainty maps and scores from the segmenter's own pass.

The pass is exactly `segment` without `--fast` (nnU-Net's preprocessing, the body crop's tiles,
mirroring test-time augmentation, nnU-Net's resampling back), so the label is the same; what is
added costs no extra network evaluation:

- **TTA disagreement**: in every sliding-window tile the 2^k mirrored predictions (k mirroring
  axes) are kept apart long enough to take, per voxel, the standard deviation of the node
  probability over them (0 = all mirrors agree; at most 0.5). It is stitched with nnU-Net's
  Gaussian tile weights, like the logits, and resampled back with them.
- **Softmax entropy** of the mirrored average, normalised to 0..1 (log base = number of classes).

Both are summarised over the *region of interest*: the predicted nodes and the near misses
(node probability >= ``NEAR_MISS_P``), grown by ``ROI_GROW_VOXELS`` voxels, inside the body box.
CT scores (`UncertaintyScores`): the ROI volume-weighted sums in mL (how much uncertain node
tissue there is: a CT with many doubtful nodes counts more than one with a single doubtful voxel)
and the ROI means. Per node (`NodeDoubt`): every predicted node and every near-miss blob, with
its mean entropy and disagreement and its centroid in physical (LPS) mm, most doubtful first.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from LymphNodeDGSTLib.engine.segmentation.body_crop import find_body_box
from LymphNodeDGSTLib.engine.images.files import ct_range_warning
from LymphNodeDGSTLib.engine.segmentation.segmenter import ProgressCallback, Segmenter, preprocess_case

NEAR_MISS_P = 0.25      # node probability from which a voxel is a near miss
ROI_GROW_VOXELS = 2     # the ROI is grown by this many voxels (26-neighbourhood) around nodes
SCORE_VERSION = 1       # bump when the scores' definition changes (the rank cache keys on it)


@dataclass
class NodeDoubt:
    """One predicted node (kind 'node') or near-miss blob (kind 'near_miss') and its doubt."""

    kind: str
    voxels: int
    volume_mm3: float
    centroid_lps_mm: tuple[float, float, float]
    entropy_mean: float
    tta_mean: float
    doubt: float         # (entropy_mean + 2 tta_mean) / 2: both on a 0..1 scale


@dataclass
class UncertaintyScores:
    """Whole-CT scores (the ROI is the predicted nodes and near misses, grown)."""

    entropy_ml: float        # sum of entropy over the ROI, in mL
    tta_ml: float            # sum of 2 x TTA disagreement over the ROI, in mL
    entropy_mean: float      # mean entropy over the ROI (0 when the ROI is empty)
    tta_mean: float          # mean 2 x disagreement over the ROI
    roi_ml: float
    predicted_ml: float      # predicted node volume
    nodes: int               # predicted nodes
    near_misses: int         # near-miss blobs outside predicted nodes

    @property
    def score(self) -> float:
        """The ranking score: uncertain node tissue in mL, both kinds averaged."""
        return 0.5 * (self.entropy_ml + self.tta_ml)


@dataclass
class UncertaintyResult:
    label: sitk.Image
    entropy: np.ndarray          # z, y, x float32, 0..1
    disagreement: np.ndarray     # z, y, x float32, 0..0.5
    scores: UncertaintyScores
    nodes: list[NodeDoubt]
    model: str
    seconds: float
    mirrors: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready scores and nodes (no arrays)."""
        return {"score": self.scores.score, **asdict(self.scores), "mirrors": self.mirrors,
                "node_doubts": [asdict(n) for n in self.nodes], "model": self.model,
                "seconds": round(self.seconds, 2), "warnings": self.warnings}


def _mirrored_with_disagreement(predictor, x: torch.Tensor) -> torch.Tensor:
    """The segmenter's tile pass for uncertainty: the mirrored average (computed in nnU-Net's own
    order, so bitwise the same) plus one channel, the spread of the foreground probability over
    the mirrors."""
    axes = [a + 2 for a in (predictor.allowed_mirroring_axes or ())]
    combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
    regions = predictor.label_manager.has_regions
    first = predictor.network(x)
    prediction = first.clone()
    foreground = [_foreground_probability(first, regions)]
    for flip in combinations:
        mirrored = torch.flip(predictor.network(torch.flip(x, flip)), flip)
        prediction += mirrored
        foreground.append(_foreground_probability(mirrored, regions))
    prediction /= (len(combinations) + 1)
    spread = torch.stack(foreground).std(dim=0, unbiased=False)[:, None]
    return torch.cat([prediction, spread.to(prediction.dtype)], dim=1)


def _foreground_probability(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """(batch, z, y, x) probability that a voxel is any node class."""
    if regions:
        return torch.sigmoid(logits.float()).amax(dim=1)
    return 1.0 - torch.softmax(logits.float(), dim=1)[:, 0]


def segment_with_uncertainty(segmenter: Segmenter, image: sitk.Image, model=None,
                             crop_body: bool = True, progress: ProgressCallback | None = None,
                             cancel_event: threading.Event | None = None) -> UncertaintyResult:
    """The accurate (mirrored) segmentation of `image` plus its uncertainty, in one pass."""
    started = time.perf_counter()
    array = sitk.GetArrayFromImage(image)
    spacing_zyx = list(image.GetSpacing())[::-1]
    warnings = [w for w in [ct_range_warning(array)] if w]
    version = segmenter._resolve(model)
    predictor = segmenter._predictor_for(version, progress)
    box = find_body_box(array, spacing_zyx) if crop_body else None
    with segmenter._running(predictor, False, progress, cancel_event, "scoring uncertainty", "try --device cpu"):
        label, entropy, disagreement = _predict_maps(predictor, array, spacing_zyx, box, progress)
    mirrors = 2 ** len(predictor.allowed_mirroring_axes or ())
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    scores, nodes = summarise(label, entropy, disagreement, image)
    return UncertaintyResult(label_image, entropy, disagreement, scores, nodes, version.ref,
                             time.perf_counter() - started, mirrors, warnings)


def _predict_maps(predictor, array_zyx: np.ndarray, spacing_zyx: Sequence[float], box,
                  progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The segmenter's tiling with the disagreement channel carried through it and through
    resampling; label (uint8), entropy and disagreement (float32) on the input grid."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    if progress:
        progress("preprocess", 0, 1)
    data, properties = preprocess_case(predictor, array_zyx, spacing_zyx)
    if progress:
        progress("preprocess", 1, 1)
    labels = predictor.label_manager
    stacked, _ = Segmenter.tile_logits(predictor, data, properties, box,
                                       tile_pass=_mirrored_with_disagreement, extra_channels=1)
    del data
    channels = labels.num_segmentation_heads
    if progress:
        progress("resample", 0, 1)
    plans, configuration = predictor.plans_manager, predictor.configuration_manager
    spacing_transposed = [properties["spacing"][i] for i in plans.transpose_forward]
    before = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = configuration.spacing if len(configuration.spacing) == len(before) \
        else [spacing_transposed[0], *configuration.spacing]
    resampled = configuration.resampling_fn_probabilities(stacked, before, current_spacing, spacing_transposed)
    resampled = torch.as_tensor(resampled)
    logits, spread = resampled[:channels], resampled[channels].float().numpy()
    segmentation = labels.convert_logits_to_segmentation(logits)
    probabilities = labels.apply_inference_nonlin(logits).float().numpy()
    entropy = _normalised_entropy(probabilities, labels.has_regions)

    def to_input_grid(values: np.ndarray, dtype) -> np.ndarray:
        full = np.zeros(properties["shape_before_cropping"], dtype=dtype)
        full = insert_crop_into_image(full, np.asarray(values, dtype=dtype), properties["bbox_used_for_cropping"])
        return np.ascontiguousarray(np.asarray(full).transpose(plans.transpose_backward))

    label = to_input_grid(np.asarray(segmentation), np.uint8)
    entropy = to_input_grid(entropy, np.float32)
    disagreement = to_input_grid(np.clip(spread, 0, 0.5), np.float32)
    if box is not None:
        outside = np.ones(label.shape, dtype=bool)
        outside[box.slices] = False
        label[outside] = 0
        entropy[outside] = 0
        disagreement[outside] = 0
    if progress:
        progress("resample", 1, 1)
    return label, entropy, disagreement


def _normalised_entropy(probabilities: np.ndarray, regions: bool) -> np.ndarray:
    """Per-voxel entropy in 0..1 (classes: softmax channels; regions: the worst binary one)."""
    p = np.clip(probabilities, 1e-6, 1.0)
    if regions:
        q = np.clip(1.0 - probabilities, 1e-6, 1.0)
        return (-(p * np.log2(p) + q * np.log2(q))).max(axis=0).astype(np.float32)
    return (-(p * np.log(p)).sum(axis=0) / np.log(max(p.shape[0], 2))).astype(np.float32)


def summarise(label: np.ndarray, entropy: np.ndarray, disagreement: np.ndarray,
              image: sitk.Image) -> tuple[UncertaintyScores, list[NodeDoubt]]:
    """CT scores over the ROI and one `NodeDoubt` per node or near miss, most doubtful first.

    Near misses are voxels whose entropy says the node probability is at least NEAR_MISS_P
    (binary entropy >= H(NEAR_MISS_P)) outside the predicted nodes."""
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    predicted = label > 0
    near_threshold = _binary_entropy(NEAR_MISS_P)
    near = (entropy >= near_threshold) & ~predicted
    structure = np.ones((3, 3, 3), dtype=bool)
    roi = ndimage.binary_dilation(predicted | near, structure, iterations=ROI_GROW_VOXELS)
    tta = 2.0 * disagreement
    roi_voxels = int(roi.sum())
    components, count = ndimage.label(predicted | near, structure)
    nodes: list[NodeDoubt] = []
    for index, slices in enumerate(ndimage.find_objects(components), 1):
        if slices is None:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in slices)
        mask = ndimage.binary_dilation(components[grown] == index, structure)
        inside = components[slices] == index
        kind = "node" if predicted[slices][inside].any() else "near_miss"
        voxels = int(inside.sum())
        centre = np.array([s.start for s in slices]) + np.array(ndimage.center_of_mass(inside))
        point = image.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre[::-1]])
        entropy_mean = float(entropy[grown][mask].mean())
        tta_mean = float(tta[grown][mask].mean())
        nodes.append(NodeDoubt(kind, voxels, round(voxels * voxel_ml * 1000.0, 2),
                               tuple(round(float(c), 2) for c in point), round(entropy_mean, 4),
                               round(tta_mean, 4), round(0.5 * (entropy_mean + tta_mean), 4)))
    nodes.sort(key=lambda n: -n.doubt)
    scores = UncertaintyScores(
        entropy_ml=round(float(entropy[roi].sum()) * voxel_ml, 4),
        tta_ml=round(float(tta[roi].sum()) * voxel_ml, 4),
        entropy_mean=round(float(entropy[roi].mean()) if roi_voxels else 0.0, 4),
        tta_mean=round(float(tta[roi].mean()) if roi_voxels else 0.0, 4),
        roi_ml=round(roi_voxels * voxel_ml, 4),
        predicted_ml=round(float(predicted.sum()) * voxel_ml, 4),
        nodes=sum(1 for n in nodes if n.kind == "node"),
        near_misses=sum(1 for n in nodes if n.kind == "near_miss"))
    return scores, nodes


def _binary_entropy(p: float) -> float:
    return float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))
