"""Inference backends for the segmenter's per-tile network call (CPU fast paths).

nnU-Net's predictor keeps its tiling, Gaussian weighting, mirroring and accumulation; only the
call `network(tile)` changes. `BackendNetwork` stands in for the predictor's network: nnU-Net
loads each fold's weights with `load_state_dict` and then calls it once per tile (and per mirror);
here that call goes to the fold's converted model.

Backends: `torch` (fp32, today's path), `torch-bf16` (CPU autocast), `openvino` (f32 IR),
`openvino-bf16` (same IR, bf16 inference-precision hint), `openvino-int8` (the f32 IR quantised
with NNCF: calibration.py), `onnxruntime` (f32 ONNX).
`auto` takes the first of AUTO_PREFERENCE that is installed on a CPU run and torch otherwise;
in place of OpenVINO f32 it runs what the version's guard decision adopted (decision.py). A
backend that is missing or fails falls back (choice.py) with a one-line reason.
OpenVINO keeps its compiled models (CACHE_DIR) in the version's backend cache too.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from LymphNodeDGSTLib.engine.segmentation.backends import calibration
from LymphNodeDGSTLib.engine.segmentation.backends.cache import (cache_key, cache_root, file_sha256,
                                                                 find_cached, store_conversion)
from LymphNodeDGSTLib.engine.segmentation.backends.names import (AUTO_PREFERENCE, BACKEND_CHOICES, FORMAT_OF,
                                                                 OPENVINO_BACKENDS, PACKAGE_OF)
from LymphNodeDGSTLib.errors import UserInputError


Runner = Callable[[torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[str, int, int], None]
CalibrationSource = Callable[[], calibration.CalibrationSet]
COMPILED_DIR = "openvino-compiled"  # OpenVINO's CACHE_DIR inside the version's backend cache


@dataclass(frozen=True)
class BackendChoice:
    """The backend that runs, and a one-line reason when it is not the one asked for."""

    requested: str
    used: str
    reason: str | None = None
    convert_later: str | None = None  # a backend to convert in the background after this run
    detail: str | None = None  # what the guard found, e.g. "guard Dice 0.9981" (decision.py)


def check_backend_name(name: str | None) -> str:
    name = (name or "auto").lower()
    if name not in BACKEND_CHOICES:
        raise UserInputError(f"unknown backend '{name}'; use one of {', '.join(BACKEND_CHOICES)}")
    return name


def package_status(backend: str) -> tuple[str | None, str | None]:
    """(package version, None) when the backend's package imports, else (None, reason)."""
    package = PACKAGE_OF.get(backend)
    if package is None:
        return torch.__version__, None
    try:
        importlib.import_module(package)
    except Exception as error:  # missing, or a broken install
        return None, f"{package} is not installed ({type(error).__name__}: {error})".splitlines()[0]
    try:
        return importlib.metadata.version(package), None
    except importlib.metadata.PackageNotFoundError:
        return "unknown", None


def resolve_backend(requested: str, device: torch.device) -> BackendChoice:
    """Which backend to try: `auto` -> the preferred installed CPU backend, else torch."""
    requested = check_backend_name(requested)
    if device.type != "cpu":
        if requested in ("auto", "torch"):
            return BackendChoice(requested, "torch")
        return BackendChoice(requested, "torch", f"{requested} is a CPU backend; {device.type} runs torch")
    if requested != "auto":
        return BackendChoice(requested, requested)
    reasons = []
    for candidate in AUTO_PREFERENCE:
        version, reason = package_status(candidate)
        if version is not None:
            return BackendChoice(requested, candidate)
        reasons.append(reason)
    return BackendChoice(requested, "torch", "; ".join(r for r in reasons if r) or None)


# --------------------------------------------------------------------------- runners
class TorchBf16Runner:
    """The torch network under CPU bf16 autocast; logits returned as float32."""

    def __init__(self, network: nn.Module):
        self.network = network

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.network(x).float()


class OpenVINORunner:
    """A compiled OpenVINO model with one infer request (tiles run one after the other)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.request.infer([np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)])
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data, dtype=np.float32))


class OnnxRuntimeRunner:
    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def inference_threads() -> int:
    """The threads torch would use in nnU-Net's prediction (it caps them at nnUNet_def_n_proc)."""
    from nnunetv2.configuration import default_num_processes
    return max(1, min(torch.get_num_threads(), default_num_processes))


def convert(fmt: str, network: nn.Module, example: torch.Tensor, folder: Path) -> None:
    """Write `network` (eval mode, fixed input shape) as OpenVINO IR or ONNX into `folder`."""
    network = network.eval()
    with torch.no_grad():
        if fmt == "openvino":
            import openvino as ov
            model = ov.convert_model(network, example_input=example)
            ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
        elif fmt == "onnx":
            torch.onnx.export(network, (example,), str(folder / "model.onnx"), input_names=["x"],
                              output_names=["logits"], opset_version=17, dynamo=False)
        else:
            raise ValueError(f"no conversion to {fmt}")


def load_runner(backend: str, folder: Path, compiled_cache: Path | None = None) -> Runner:
    """A runner for a cached conversion; OpenVINO keeps the compiled model in `compiled_cache`
    (a later process imports it instead of compiling again)."""
    threads = inference_threads()
    if backend in OPENVINO_BACKENDS:
        import openvino as ov
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if backend == "openvino-bf16" else "f32"}
        if compiled_cache is not None:
            compiled_cache.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(compiled_cache)
        return OpenVINORunner(ov.Core().compile_model(str(folder / "model.xml"), "CPU", config))
    if backend == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return OnnxRuntimeRunner(ort.InferenceSession(str(folder / "model.onnx"), options,
                                                      providers=["CPUExecutionProvider"]))
    raise ValueError(f"no converted runner for {backend}")


def converter_version(backend: str) -> str:
    """The converter's version for cache keys; raises when a package the conversion needs is
    missing (INT8 needs NNCF besides OpenVINO)."""
    version, reason = package_status(backend)
    if version is None:
        raise RuntimeError(reason)
    if backend == "openvino-int8":
        nncf = calibration.nncf_version()
        if nncf is None:
            raise RuntimeError("nncf is not installed (the INT8 backend quantises with it)")
        version = f"{version}+nncf{nncf}"
    return version


def conversion_key(backend: str, checkpoint: Path, input_shape: Sequence[int]) -> str:
    """The cache key of one fold's conversion for `backend` (raises when its package is missing)."""
    return cache_key(FORMAT_OF[backend], converter_version(backend), file_sha256(checkpoint),
                     input_shape)


def one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def quantize_int8(f32_folder: Path, calibrate: CalibrationSource | None, folder: Path) -> dict:
    """Quantise the f32 IR in `f32_folder` into `folder`; what it was calibrated on."""
    if calibrate is None:
        raise RuntimeError("INT8 calibration failed: no calibration cases")
    try:
        cases = calibrate()
        calibration.quantize_openvino_int8(f32_folder / "model.xml", cases, folder)
    except Exception as error:
        raise RuntimeError(f"INT8 calibration failed: {one_line(error)}") from error
    return {"calibration_cases": cases.cases, "calibration_tiles": len(cases.tiles)}


def ensure_converted(backend: str, network: nn.Module, weights: dict, checkpoint: Path,
                     version_path: Path, input_shape: Sequence[int],
                     progress: ProgressCallback | None = None,
                     calibrate: CalibrationSource | None = None) -> Path:
    """The cached conversion of one fold, made now (atomically) when there is none. INT8 is
    quantised from the fold's f32 IR (converted first when needed) on `calibrate()`'s tiles."""
    key = conversion_key(backend, checkpoint, input_shape)
    folder = find_cached(version_path, key)
    if folder is not None:
        return folder
    fmt = FORMAT_OF[backend]
    if backend == "openvino-int8":
        f32 = ensure_converted("openvino", network, weights, checkpoint, version_path, input_shape,
                               progress)
        if progress:
            progress("quantize", 0, 1)
        meta = {"format": fmt, "converter": converter_version(backend), "checkpoint": checkpoint.name,
                "input_shape": list(input_shape)}
        folder = store_conversion(version_path, key,
                                  lambda f: meta.update(quantize_int8(f32, calibrate, f)), meta)
        if progress:
            progress("quantize", 1, 1)
        return folder
    if progress:
        progress("convert", 0, 1)
    network.load_state_dict(weights)
    example = torch.zeros(tuple(input_shape), dtype=torch.float32)
    meta = {"format": fmt, "converter": package_status(backend)[0], "checkpoint": checkpoint.name,
            "input_shape": list(input_shape), "torch": torch.__version__}
    folder = store_conversion(version_path, key, lambda f: convert(fmt, network, example, f), meta)
    if progress:
        progress("convert", 1, 1)
    return folder


def converted_runner(backend: str, network: nn.Module, weights: dict, checkpoint: Path,
                     version_path: Path | None, input_shape: Sequence[int],
                     progress: ProgressCallback | None = None,
                     calibrate: CalibrationSource | None = None) -> Runner:
    """A runner for one fold: from the version's cache (converted first when needed), or
    converted in a throw-away folder for a results folder outside the store."""
    if version_path is not None:
        folder = ensure_converted(backend, network, weights, checkpoint, version_path, input_shape,
                                  progress, calibrate)
        return load_runner(backend, folder, cache_root(version_path) / COMPILED_DIR)
    import tempfile
    conversion_key(backend, checkpoint, input_shape)  # the package is there
    network.load_state_dict(weights)
    with tempfile.TemporaryDirectory(prefix="lndgst-convert-", ignore_cleanup_errors=True) as scratch:
        scratch = Path(scratch)
        if backend == "openvino-int8":
            (scratch / "f32").mkdir()
            convert("openvino", network, torch.zeros(tuple(input_shape)), scratch / "f32")
            quantize_int8(scratch / "f32", calibrate, scratch)
        else:
            convert(FORMAT_OF[backend], network, torch.zeros(tuple(input_shape)), scratch)
        return load_runner(backend, scratch)  # compiled in memory: the files may go


# --------------------------------------------------------------------------- the stand-in
class BackendNetwork(nn.Module):
    """Stands in for the predictor's network: `load_state_dict(fold_weights)` selects that fold's
    runner (and loads the torch network, which stays the reference), `forward` runs it."""

    def __init__(self, network: nn.Module, fold_weights: list[dict], runners: list[Runner],
                 backend: str):
        super().__init__()
        self.network = network
        self.fold_weights = fold_weights
        self.runners = runners
        self.backend = backend
        self.active = 0

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for index, weights in enumerate(self.fold_weights):
            if weights is state_dict:
                self.active = index
                break
        else:
            raise RuntimeError("weights that are not one of the model's folds were loaded into a "
                               f"{self.backend} network")
        return self.network.load_state_dict(state_dict, strict=strict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runners[self.active](x)


def build_backend_network(backend: str, network: nn.Module, fold_weights: list[dict],
                          checkpoints: list[Path], version_path: Path | None,
                          input_shape: Sequence[int],
                          progress: ProgressCallback | None = None,
                          calibrate: CalibrationSource | None = None) -> BackendNetwork:
    """The stand-in network for `backend`; raises when the backend cannot run. `calibrate`:
    the INT8 calibration set, asked for only when a fold has no INT8 model yet."""
    if backend == "torch-bf16":
        runner = TorchBf16Runner(network)
        runners = [runner] * len(fold_weights)
    else:
        runners = [converted_runner(backend, network, weights, checkpoint, version_path,
                                    input_shape, progress, calibrate)
                   for weights, checkpoint in zip(fold_weights, checkpoints)]
    stand_in = BackendNetwork(network, fold_weights, runners, backend)
    stand_in.load_state_dict(fold_weights[0])
    with torch.inference_mode():  # a trial tile: a backend that cannot run fails here, not mid-image
        output = stand_in(torch.zeros(tuple(input_shape), dtype=torch.float32))
    if not torch.isfinite(output).all():
        raise RuntimeError(f"{backend} gave non-finite logits on a trial tile")
    return stand_in

