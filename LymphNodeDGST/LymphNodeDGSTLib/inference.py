"""The segmenter: nnU-Net v2 inference with an installed model version.

nnU-Net's own preprocessing, sliding-window predictor and resampling do the work. We add what a
clinical tool needs around them: the patient's body cropped before the network runs, progress per
sliding-window tile, cancellation from another thread, the output on the input's exact grid, and
a model kept loaded between calls and reloaded when the active version changes (hot swap).
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from LymphNodeDGSTLib import nnunet_env  # noqa: F401  (sets nnU-Net's environment first)

import numpy as np
import SimpleITK as sitk
import torch

from LymphNodeDGSTLib.bodycrop import crop, find_body_box, paste_back
from LymphNodeDGSTLib.checkpoints import load_checkpoint
from LymphNodeDGSTLib.devices import choose_device
from LymphNodeDGSTLib.errors import Cancelled, OutOfMemory
from LymphNodeDGSTLib.images import ct_range_warning
from LymphNodeDGSTLib.models import ModelStore, ModelVersion
from LymphNodeDGSTLib.modelcheck import find_checkpoints

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


def _make_predictor_class():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class ReportingPredictor(nnUNetPredictor):
        """nnU-Net's predictor, reporting each sliding-window tile and stopping on request."""

        progress: ProgressCallback | None = None
        cancel_event: threading.Event | None = None
        _tiles_total = 0
        _tiles_done = 0

        def _internal_get_sliding_window_slicers(self, image_size):
            slicers = super()._internal_get_sliding_window_slicers(image_size)
            self._tiles_total, self._tiles_done = len(slicers), 0
            return slicers

        def _internal_maybe_mirror_and_predict(self, x):
            if self.cancel_event is not None and self.cancel_event.is_set():
                raise Cancelled("segmentation cancelled")
            prediction = super()._internal_maybe_mirror_and_predict(x)
            self._tiles_done += 1
            if self.progress is not None:
                self.progress("predict", self._tiles_done, self._tiles_total)
            return prediction

    return ReportingPredictor


class Segmenter:
    """Segments CT images with the active (or a named) version of an installed model.

    Keep one alive for the life of the process (the Slicer module does): the network stays
    loaded between calls and is reloaded only when the requested version changes.
    """

    def __init__(self, store: ModelStore, device: str = "auto", trust_checkpoint: bool = False):
        self.store = store
        self.device = choose_device(device)
        self.trust_checkpoint = trust_checkpoint
        self._predictor = None
        self._loaded: ModelVersion | None = None

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
                                  time.perf_counter() - started, body_fraction, warnings)

    def segment_array(self, array_zyx: np.ndarray, spacing_zyx: Sequence[float],
                      model: str | ModelVersion | None = None, fast: bool = False, crop_body: bool = True,
                      progress: ProgressCallback | None = None,
                      cancel_event: threading.Event | None = None) -> tuple[np.ndarray, float | None]:
        """Label array (z, y, x, uint8) for a CT array in SimpleITK's axis order, and the share of
        voxels inside the body crop (None when not cropped). `model` is a spec ('NAME',
        'NAME@N', None for the only model) or a ModelVersion (e.g. one not yet published)."""
        version = model if isinstance(model, ModelVersion) else self.store.resolve(model)
        predictor = self._predictor_for(version, progress)
        predictor.use_mirroring = not fast
        predictor.progress, predictor.cancel_event = progress, cancel_event
        box = find_body_box(array_zyx, spacing_zyx) if crop_body else None
        region = crop(array_zyx, box) if box is not None else array_zyx
        try:
            label = self._predict(predictor, region, spacing_zyx, progress)
        except torch.OutOfMemoryError:
            _release_memory(self.device)
            raise OutOfMemory(f"out of memory on {self.device} while segmenting; try --fast, "
                              "or --device cpu") from None
        finally:
            predictor.progress = predictor.cancel_event = None
        if box is None:
            return label, None
        return paste_back(label, box, array_zyx.shape), float(region.size) / float(array_zyx.size)

    def _predict(self, predictor, array_zyx: np.ndarray, spacing_zyx: Sequence[float],
                 progress: ProgressCallback | None) -> np.ndarray:
        from nnunetv2.inference.export_prediction import \
            convert_predicted_logits_to_segmentation_with_correct_shape

        if progress:
            progress("preprocess", 0, 1)
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(
            array_zyx[None].astype(np.float32, copy=False), None, {"spacing": list(spacing_zyx)},
            predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
        if progress:
            progress("preprocess", 1, 1)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        del data
        if progress:
            progress("resample", 0, 1)
        label = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits, predictor.plans_manager, predictor.configuration_manager,
            predictor.label_manager, properties)
        if progress:
            progress("resample", 1, 1)
        return np.asarray(label, dtype=np.uint8)

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
        return self._predictor


def load_predictor(version: ModelVersion, device: torch.device, trust_checkpoint: bool = False):
    """An nnU-Net predictor for an installed version, loaded without arbitrary unpickling.

    The network is built from plans.json (not looked up by trainer name), so models trained with
    custom trainer classes load as long as their network is a standard nnU-Net architecture.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from LymphNodeDGSTLib.architectures import build_network, read_json

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


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
