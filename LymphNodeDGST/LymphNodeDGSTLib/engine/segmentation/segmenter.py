"""The segmenter: nnU-Net v2 inference with an installed model version.

nnU-Net's own preprocessing, sliding-window predictor and resampling do the work. We add what a
clinical tool needs around them: the patient's body cropped before the network runs, progress per
sliding-window tile, cancellation from another thread, the output on the input's exact grid, and
a model kept loaded between calls and reloaded when the active version changes (hot swap).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from LymphNodeDGSTLib.engine import nnunet_env  # noqa: F401  (sets nnU-Net's environment first)

import numpy as np
import SimpleITK as sitk
import torch

from LymphNodeDGSTLib.engine.segmentation.backends.choice import attach_backend, start_pending_conversion
from LymphNodeDGSTLib.engine.segmentation.backends.networks import BackendChoice, check_backend_name
from LymphNodeDGSTLib.engine.segmentation.body_crop import BodyBox, find_body_box
from LymphNodeDGSTLib.engine.store.checkpoints import load_checkpoint
from LymphNodeDGSTLib.engine.segmentation.devices import choose_device
from LymphNodeDGSTLib.errors import Cancelled, OutOfMemory, UserInputError
from LymphNodeDGSTLib.engine.images.files import ct_range_warning
from LymphNodeDGSTLib.engine.store.models import ModelStore, ModelVersion
from LymphNodeDGSTLib.engine.store.results_folders import find_checkpoints

# progress(stage, done, total); stages: "load", "preprocess", "predict", "resample"
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class SegmentationResult:
    label: sitk.Image
    model: str
    device: str
    seconds: float
    body_fraction: float | None = None
    warnings: list[str] = field(default_factory=list)
    backend: str = "torch"
    backend_note: str | None = None  # why the backend differs from the one asked for
    backend_detail: str | None = None  # what the accuracy guard found, e.g. "guard Dice 0.9981"


@dataclass
class PreparedCase:
    """A CT after stage 1 of segmentation (preprocessed, body box found), before the network."""

    image: sitk.Image
    version: ModelVersion
    preprocessed: tuple[np.ndarray, dict]
    box: BodyBox | None
    warnings: list[str]
    seconds: float


def _make_predictor_class():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class ReportingPredictor(nnUNetPredictor):
        """nnU-Net's predictor, reporting each sliding-window tile and stopping on request."""

        progress: ProgressCallback | None = None
        cancel_event: threading.Event | None = None
        # Body crop: only the tiles of the whole-image tiling that overlap this region run.
        tile_region: tuple[slice, ...] | None = None
        tile_region_shape: tuple[int, ...] | None = None
        tiles_all = 0   # tiles of the whole-image tiling
        tiles_run = 0   # of those, the tiles that run (all, or those overlapping tile_region)
        _tiles_done = 0
        # The hook for other passes over the same tiles (the uncertainty pass): replaces nnU-Net's
        # mirrored per-tile prediction; called as tile_pass(predictor, tile).
        tile_pass: Callable | None = None

        def _internal_get_sliding_window_slicers(self, image_size):
            slicers = super()._internal_get_sliding_window_slicers(image_size)
            self.tiles_all = len(slicers)
            if self.tile_region is not None:
                slicers = tiles_overlapping(slicers, self.tile_region, self.tile_region_shape, image_size)
            self.tiles_run, self._tiles_done = len(slicers), 0
            return slicers

        def _internal_maybe_mirror_and_predict(self, x):
            if self.cancel_event is not None and self.cancel_event.is_set():
                raise Cancelled("segmentation cancelled")
            if self.tile_pass is not None:
                prediction = self.tile_pass(self, x)
            else:
                prediction = super()._internal_maybe_mirror_and_predict(x)
            self._tiles_done += 1
            if self.progress is not None:
                self.progress("predict", self._tiles_done, self.tiles_run)
            return prediction

    return ReportingPredictor


class _WithExtraChannels:
    """A label manager reporting more output channels than it segments, so nnU-Net's sliding window
    allocates and stitches what a tile pass adds beside the logits."""

    def __init__(self, base, extra: int):
        self._base = base
        self.num_segmentation_heads = base.num_segmentation_heads + extra

    def __getattr__(self, name):
        return getattr(self._base, name)


class Segmenter:
    """Segments CT images with the active (or a named) version of an installed model.

    Keep one alive for the life of the process (the Slicer module does): the network stays
    loaded between calls and is reloaded only when the requested version changes.
    """

    def __init__(self, store: ModelStore | None, device: str = "auto", trust_checkpoint: bool = False,
                 default_version: ModelVersion | None = None, backend: str = "torch"):
        self.store = store
        self.default_version = default_version
        self.device = choose_device(device)
        self.backend = check_backend_name(backend)
        self.backend_choice = BackendChoice(self.backend, "torch")
        self.trust_checkpoint = trust_checkpoint
        self._predictor = None
        self._loaded: ModelVersion | None = None

    @classmethod
    def for_results_folder(cls, folder: str | os.PathLike, device: str = "auto",
                           name: str = "unregistered", backend: str = "torch") -> "Segmenter":
        """A segmenter for an nnU-Net results folder outside any model store (a model being
        trained or benchmarked); `segment(..., model=None)` uses it."""
        return cls(None, device=device, default_version=ModelVersion(name, 0, Path(folder), {}),
                   backend=backend)

    @property
    def loaded_version(self) -> ModelVersion | None:
        return self._loaded

    def segment(self, image: sitk.Image, model: str | ModelVersion | None = None, fast: bool = False,
                crop_body: bool = True, progress: ProgressCallback | None = None,
                cancel_event: threading.Event | None = None) -> SegmentationResult:
        """A label image on `image`'s exact grid (size, spacing, origin, direction)."""
        started = time.perf_counter()
        array = sitk.GetArrayFromImage(image)  # z, y, x
        spacing_zyx = list(image.GetSpacing())[::-1]
        warnings = [w for w in [ct_range_warning(array)] if w]
        label, body_fraction = self.segment_array(array, spacing_zyx, model, fast, crop_body,
                                                  progress, cancel_event)
        output = sitk.GetImageFromArray(label)
        output.CopyInformation(image)
        return SegmentationResult(output, self._loaded.ref, str(self.device),
                                  time.perf_counter() - started, body_fraction, warnings,
                                  self.backend_choice.used, self.backend_choice.reason,
                                  self.backend_choice.detail)

    def _resolve(self, model: str | ModelVersion | None) -> ModelVersion:
        if isinstance(model, ModelVersion):
            return model
        if model is None and self.default_version is not None:
            return self.default_version
        if self.store is None:
            raise UserInputError(f"no model store to find model '{model}' in")
        return self.store.resolve(model)

    def segment_array(self, array_zyx: np.ndarray, spacing_zyx: Sequence[float],
                      model: str | ModelVersion | None = None, fast: bool = False, crop_body: bool = True,
                      progress: ProgressCallback | None = None,
                      cancel_event: threading.Event | None = None) -> tuple[np.ndarray, float | None]:
        """Label array (z, y, x, uint8) for a CT array in SimpleITK's axis order, and the share of
        voxels inside the body crop (None when not cropped). `model` is a spec ('NAME',
        'NAME@N', None for the only model) or a ModelVersion (e.g. one not yet published)."""
        version = self._resolve(model)
        predictor = self._predictor_for(version, progress)
        box = find_body_box(array_zyx, spacing_zyx) if crop_body else None
        with self._running(predictor, fast, progress, cancel_event):
            label, body_fraction = self._predict(predictor, array_zyx, spacing_zyx, box, progress)
        self.backend_choice = start_pending_conversion(self.backend_choice,
                                                       version.path if version.version > 0 else None)
        return label, body_fraction

    @contextlib.contextmanager
    def _running(self, predictor, fast: bool, progress: ProgressCallback | None,
                 cancel_event: threading.Event | None, doing: str = "segmenting",
                 advice: str = "try --fast, or --device cpu"):
        """The predictor set up for one run (mirroring, progress, cancel); out of memory becomes
        OutOfMemory with advice; the callbacks are dropped afterwards."""
        predictor.use_mirroring = not fast
        predictor.progress, predictor.cancel_event = progress, cancel_event
        try:
            yield
        except torch.OutOfMemoryError:
            _release_memory(self.device)
            raise OutOfMemory(f"out of memory on {self.device} while {doing}; {advice}") from None
        finally:
            predictor.progress = predictor.cancel_event = None

    def use_weights(self, weights: dict) -> None:
        """Segment the loaded version with these network weights (one set, no fold ensemble)
        instead of its checkpoints', until another version is loaded: a network still in
        training is scored without writing it to disk. Load the version first (`prepare`)."""
        if self._predictor is None:
            raise RuntimeError("use_weights needs a loaded version: call prepare() or segment() first")
        if self.backend_choice.used != "torch":
            raise RuntimeError(f"use_weights needs the torch backend, not {self.backend_choice.used}")
        self._predictor.list_of_parameters = [weights]

    # ------------------------------------------------------------ two stages, for batch prefetch
    def prepare(self, image: sitk.Image, model: str | ModelVersion | None = None,
                crop_body: bool = True) -> "PreparedCase":
        """Stage 1 of `segment` (no network): CT checks, body box and nnU-Net's preprocessing.
        Thread-safe against `segment_prepared` running on another case (batch prefetch)."""
        started = time.perf_counter()
        version = self._resolve(model)
        predictor = self._predictor_for(version, None)
        array = sitk.GetArrayFromImage(image)
        spacing_zyx = list(image.GetSpacing())[::-1]
        warnings = [w for w in [ct_range_warning(array)] if w]
        box = find_body_box(array, spacing_zyx) if crop_body else None
        preprocessed = preprocess_case(predictor, array, spacing_zyx)
        return PreparedCase(image, version, preprocessed, box, warnings, time.perf_counter() - started)

    def segment_prepared(self, prepared: "PreparedCase", fast: bool = False,
                         progress: ProgressCallback | None = None,
                         cancel_event: threading.Event | None = None) -> SegmentationResult:
        """Stage 2 of `segment`: the network and resampling on a case `prepare` made."""
        started = time.perf_counter()
        predictor = self._predictor_for(prepared.version, progress)
        with self._running(predictor, fast, progress, cancel_event):
            label, body_fraction = self._predict(predictor, None, (), prepared.box, progress,
                                                 preprocessed=prepared.preprocessed)
        output = sitk.GetImageFromArray(label)
        output.CopyInformation(prepared.image)
        return SegmentationResult(output, self._loaded.ref, str(self.device),
                                  prepared.seconds + time.perf_counter() - started, body_fraction,
                                  list(prepared.warnings))

    def _predict(self, predictor, array_zyx: np.ndarray | None, spacing_zyx: Sequence[float],
                 box: BodyBox | None, progress: ProgressCallback | None,
                 preprocessed: tuple[np.ndarray, dict] | None = None) -> tuple[np.ndarray, float | None]:
        """nnU-Net's preprocessing on the whole image; the network only on the tiles of nnU-Net's
        own whole-image tiling that overlap the body box, so every voxel inside the box gets
        exactly the logits the uncropped run gives it; nnU-Net's resampling back; 0 outside."""
        from nnunetv2.inference.export_prediction import \
            convert_predicted_logits_to_segmentation_with_correct_shape

        if progress:
            progress("preprocess", 0, 1)
        if preprocessed is None:
            preprocessed = preprocess_case(predictor, array_zyx, spacing_zyx)
        data, properties = preprocessed
        if progress:
            progress("preprocess", 1, 1)
        logits, body_fraction = self.tile_logits(predictor, data, properties, box)
        del data
        if progress:
            progress("resample", 0, 1)
        label = np.asarray(convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, predictor.plans_manager, predictor.configuration_manager,
            predictor.label_manager, properties), dtype=np.uint8)
        if box is not None:
            outside = np.ones(label.shape, dtype=bool)
            outside[box.slices] = False
            label[outside] = 0
        if progress:
            progress("resample", 1, 1)
        return label, body_fraction

    @staticmethod
    def tile_logits(predictor, data: np.ndarray, properties: dict, box: BodyBox | None,
                    tile_pass: Callable | None = None, extra_channels: int = 0) -> tuple[torch.Tensor, float | None]:
        """The network over nnU-Net's own whole-image tiling of preprocessed `data`, only on the
        tiles that overlap the body box, so every voxel inside the box gets exactly the logits the
        uncropped run gives it; voxels no kept tile covers are certain background. `tile_pass`
        (with `extra_channels` it adds after the logits) replaces the per-tile prediction: the
        uncertainty pass's hook. (logits, share of the tiles that ran, or None without a box)."""
        labels = predictor.label_manager
        if box is not None:
            predictor.tile_region = box_in_preprocessed_grid(
                box, properties, predictor.plans_manager.transpose_forward, data.shape[1:])
            predictor.tile_region_shape = data.shape[1:]
        if extra_channels:  # nnU-Net sizes its stitching buffer by the label manager's heads
            predictor.label_manager = _WithExtraChannels(labels, extra_channels)
        predictor.tile_pass = tile_pass
        try:
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        finally:
            predictor.tile_region = predictor.tile_region_shape = predictor.tile_pass = None
            predictor.label_manager = labels
        body_fraction = None
        if box is not None:
            body_fraction = predictor.tiles_run / max(predictor.tiles_all, 1)
            heads = labels.num_segmentation_heads
            with torch.inference_mode():  # the logits are inference tensors
                uncovered = torch.isnan(logits[0])
                logits[:heads, uncovered] = background_logits(heads, logits.dtype, labels.has_regions)
                logits[heads:, uncovered] = 0
        return logits, body_fraction

    def _predictor_for(self, version: ModelVersion, progress: ProgressCallback | None):
        if self._loaded is not None and self._loaded.path == version.path:
            return self._predictor
        if progress:
            progress("load", 0, 1)
        self._predictor = None
        self._predictor = load_predictor(version, self.device, self.trust_checkpoint)
        self._loaded = version
        if progress:
            progress("load", 1, 1)
        # the backend replaces the per-tile network call; conversions are cached in store versions
        self.backend_choice = attach_backend(
            self._predictor, self.backend, self.device, list(find_checkpoints(version.path).values()),
            version.path if version.version > 0 else None, progress)
        return self._predictor


def preprocess_case(predictor, array_zyx: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, dict]:
    """nnU-Net's own preprocessing of one CT: (data, properties) ready for the network."""
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case_npy(
        array_zyx[None].astype(np.float32, copy=False), None, {"spacing": list(spacing_zyx)},
        predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    return data, properties


def load_predictor(version: ModelVersion, device: torch.device, trust_checkpoint: bool = False):
    """An nnU-Net predictor for an installed version, loaded without arbitrary unpickling.

    The network is built from plans.json (not looked up by trainer name), so models trained with
    custom trainer classes load as long as their network is a standard nnU-Net architecture.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from LymphNodeDGSTLib.engine.store.architectures import build_network, read_json

    plans = read_json(version.path / "plans.json")
    dataset_json = read_json(version.path / "dataset.json")
    checkpoints = [load_checkpoint(path, trust=trust_checkpoint or
                                   version.metadata.get("trusted_checkpoint", False))
                   for path in find_checkpoints(version.path).values()]
    first = checkpoints[0]
    configuration = first["init_args"]["configuration"]
    plans_manager = PlansManager(plans)
    network = build_network(plans, dataset_json, configuration)
    network.load_state_dict(first["network_weights"])
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints a notice on CPU
        predictor = _make_predictor_class()(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
            perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
            allow_tqdm=False)
    predictor.manual_initialization(
        network, plans_manager, plans_manager.get_configuration(configuration),
        [c["network_weights"] for c in checkpoints], dataset_json,
        first.get("trainer_name", "nnUNetTrainer"),
        first.get("inference_allowed_mirroring_axes"))
    return predictor


def box_in_preprocessed_grid(box: BodyBox, properties: dict, transpose: Sequence[int],
                             shape: Sequence[int]) -> tuple[slice, slice, slice]:
    """The body box (original voxels) in nnU-Net's transposed, cropped and resampled grid."""
    start = [box.start_zyx[axis] for axis in transpose]
    stop = [box.stop_zyx[axis] for axis in transpose]
    nonzero_box = properties["bbox_used_for_cropping"]
    before = properties["shape_after_cropping_and_before_resampling"]
    slices = []
    for axis in range(3):
        low = min(max(start[axis] - nonzero_box[axis][0], 0), before[axis])
        high = min(max(stop[axis] - nonzero_box[axis][0], 0), before[axis])
        scale = shape[axis] / before[axis]
        slices.append(slice(max(int(np.floor(low * scale)), 0), min(int(np.ceil(high * scale)), shape[axis])))
    return tuple(slices)


def tiles_overlapping(slicers: list, region: tuple[slice, ...], region_shape: Sequence[int],
                      padded_shape: Sequence[int]) -> list:
    """The sliding-window tiles that overlap `region` (given in the unpadded grid)."""
    offsets = [(p - s) // 2 for p, s in zip(padded_shape, region_shape)]  # nnU-Net pads evenly
    kept = []
    for tile in slicers:
        spatial = tile[-len(region):]
        if all(t.start < r.stop + o and t.stop > r.start + o
               for t, r, o in zip(spatial, region, offsets)):
            kept.append(tile)
    return kept


def background_logits(channels: int, dtype: torch.dtype, regions: bool) -> torch.Tensor:
    """A (channels, 1) column of logits that say 'background' with certainty."""
    logits = torch.full((channels, 1), -10.0, dtype=dtype)
    if not regions:
        logits[0] = 10.0
    return logits


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
