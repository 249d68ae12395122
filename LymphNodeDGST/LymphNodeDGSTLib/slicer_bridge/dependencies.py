"""First use inside Slicer: which Python packages are missing, and how to install them safely.

Only the standard library is imported here: this runs before anything else is installed.

The plan: PyTorch through the PyTorch extension's PyTorchUtils (it picks the build that matches
the GPU and driver), then the rest with pip under a constraints file that pins the SimpleITK and
numpy Slicer already has (and the torch PyTorchUtils chose), so pip can never replace them.
Nothing here installs anything: the module widget asks the user, then runs the plan.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

MINIMUM_PYTHON = (3, 10)
# Never replaced by pip: Slicer's own packages, and the torch build PyTorchUtils chose.
PROTECTED_DISTRIBUTIONS = ("SimpleITK", "numpy", "torch", "torchvision")


@dataclass(frozen=True)
class Requirement:
    """One package the core needs."""

    module: str        # import name
    specifier: str     # what pip installs ("nnunetv2==2.8.1"); unused unless source is "pip"
    source: str        # "pytorchutils", "pip", or "slicer" (ships with Slicer, never installed)
    purpose: str
    optional: bool = False


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", "torch", "pytorchutils", "PyTorch (neural networks)"),
    Requirement("nnunetv2", "nnunetv2==2.8.1", "pip", "nnU-Net v2 (segmentation and training)"),
    Requirement("scipy", "scipy>=1.10", "pip", "node measurements"),
    Requirement("tqdm", "tqdm>=4.66", "pip", "progress reporting"),
    Requirement("matplotlib", "matplotlib>=3.7", "pip", "adaptation curves and reports"),
    Requirement("safetensors", "safetensors>=0.4", "pip", "site adapters (an adaptation as a small file)"),
    Requirement("peft", "peft==0.21.2", "pip", "the LoRA adaptation method", optional=True),
    Requirement("SimpleITK", "SimpleITK", "slicer", "image reading and writing"),
    Requirement("numpy", "numpy", "slicer", "arrays"),
)


def python_problem(version_info: Sequence[int] = tuple(sys.version_info)) -> str | None:
    """A message when this Python is too old for the core (and nnU-Net), else None."""
    if tuple(version_info[:2]) >= MINIMUM_PYTHON:
        return None
    running = ".".join(str(part) for part in version_info[:3])
    return (f"LymphNodeDGST needs Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} or later, but this "
            f"3D Slicer runs Python {running}. Install 3D Slicer 5.10 or later (it ships Python "
            "3.12) from https://download.slicer.org.")


def missing_requirements(find_spec: Callable[[str], object] = importlib.util.find_spec,
                         include_optional: bool = True) -> list[Requirement]:
    """The requirements whose module cannot be found (nothing is imported to find out)."""
    importlib.invalidate_caches()  # packages pip installed a moment ago must be seen

    def present(module: str) -> bool:
        try:
            return find_spec(module) is not None
        except (ImportError, ValueError):  # a broken half-installed package
            return False

    return [requirement for requirement in REQUIREMENTS
            if (include_optional or not requirement.optional) and not present(requirement.module)]


def installed_versions(distributions: Sequence[str] = PROTECTED_DISTRIBUTIONS,
                       version: Callable[[str], str] = importlib.metadata.version) -> dict[str, str]:
    """{distribution: version} of those installed."""
    found = {}
    for name in distributions:
        try:
            found[name] = version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def constraints_text(installed: Mapping[str, str]) -> str:
    """A pip constraints file pinning each installed protected distribution to its version."""
    lines = ["# Written by LymphNodeDGST: keep 3D Slicer's own packages exactly as they are."]
    for name, installed_version in sorted(installed.items(), key=lambda item: item[0].lower()):
        if not re.fullmatch(r"[A-Za-z0-9._+!-]+", installed_version):
            raise ValueError(f"unexpected version string for {name}: {installed_version!r}")
        lines.append(f"{name}=={installed_version}")
    return "\n".join(lines) + "\n"


def write_constraints(path: str | Path, installed: Mapping[str, str] | None = None) -> Path:
    """Write the constraints for the packages installed now (call it after torch is installed)."""
    path = Path(path)
    path.write_text(constraints_text(installed_versions() if installed is None else installed),
                    encoding="utf-8")
    return path


@dataclass(frozen=True)
class InstallPlan:
    """What first use has to do, in order."""

    python_problem: str | None
    missing: tuple[Requirement, ...]
    pytorch_utils_available: bool

    @property
    def install_torch(self) -> bool:
        return any(r.source == "pytorchutils" for r in self.missing)

    @property
    def pip_requirements(self) -> list[str]:
        return [r.specifier for r in self.missing if r.source == "pip"]

    @property
    def slicer_missing(self) -> list[str]:
        return [r.module for r in self.missing if r.source == "slicer"]

    @property
    def nothing_to_do(self) -> bool:
        return self.python_problem is None and not self.missing

    @property
    def ready(self) -> bool:
        """Everything the core needs is there (optional packages may be missing)."""
        return self.python_problem is None and all(r.optional for r in self.missing)

    def status_text(self) -> str:
        """One paragraph for the First use section."""
        if self.nothing_to_do:
            return "All required Python packages are installed."
        if self.ready:
            return ("Ready. Optional, for the LoRA adaptation method only: "
                    + ", ".join(r.module for r in self.missing) + ".")
        return self.blocker() or ("Missing Python packages: " + ", ".join(
            r.module for r in self.missing if not r.optional) + ". Install them below.")

    def blocker(self) -> str | None:
        """Why the plan cannot be run from the module at all, or None."""
        if self.python_problem:
            return self.python_problem
        if self.slicer_missing:
            return (f"3D Slicer's own {', '.join(self.slicer_missing)} cannot be found; these ship "
                    "with Slicer and are never installed by this module: reinstall 3D Slicer.")
        if self.install_torch and not self.pytorch_utils_available:
            return ("PyTorch is not installed, and the PyTorch extension (which installs the PyTorch "
                    "build that fits this computer's GPU) is missing: install the 'PyTorch' "
                    "extension from the Extensions Manager, restart Slicer, and come back here.")
        return None

    def pip_arguments(self, constraints_path: str | Path) -> list[str]:
        """Arguments for `pip install` (slicer.util.pip_install takes this list)."""
        return ["--constraint", str(constraints_path), *self.pip_requirements]

    def manual_command(self, constraints_path: str | Path) -> str:
        """The same installation as a command line, for IT staff or an offline wheel folder."""
        return "PythonSlicer -m pip install " + " ".join(
            f'"{part}"' if " " in part or any(c in part for c in "<>") else part
            for part in self.pip_arguments(constraints_path))

    def confirmation_text(self) -> str:
        lines = ["LymphNodeDGST needs these Python packages, which are not installed yet:"]
        lines += [f"- {r.module} ({r.purpose})" for r in self.missing if r.source != "slicer"]
        if self.install_torch:
            lines.append("PyTorch is installed by the PyTorch extension (the build that fits this "
                         "computer's GPU). It may ask you to confirm.")
        if self.pip_requirements:
            lines.append("The others are installed with pip from the internet (several hundred "
                         "MB; a few minutes). Slicer's own SimpleITK and numpy are kept as they are.")
        lines.append("Install now?")
        return "\n".join(lines)


def plan_installation(pytorch_utils_available: bool,
                      find_spec: Callable[[str], object] = importlib.util.find_spec,
                      version_info: Sequence[int] = tuple(sys.version_info),
                      include_optional: bool = True) -> InstallPlan:
    return InstallPlan(python_problem(version_info),
                       tuple(missing_requirements(find_spec, include_optional)),
                       pytorch_utils_available)


def failure_output(error: BaseException) -> str:
    """The installer's output carried by an exception (CalledProcessError keeps stdout and
    stderr; Slicer 5.10's pip_install puts pip's output in `output`, newer ones run uv)."""
    parts = [getattr(error, name, None) for name in ("output", "stderr")]
    text = "\n".join(p if isinstance(p, str) else p.decode(errors="replace") for p in parts if p)
    return text or str(error)


def user_declined(error: BaseException) -> bool:
    """Whether the installation stopped because the user said no in Slicer's own dialog."""
    return type(error).__name__ == "InstallationAbortedError"


# Markers in pip's (or uv's) output, and what to tell the user about each.
_NETWORK_MARKERS = ("Temporary failure in name resolution", "Name or service not known",
                    "Failed to establish a new connection", "NewConnectionError",
                    "Network is unreachable", "Connection timed out", "ConnectTimeoutError",
                    "ReadTimeoutError", "getaddrinfo failed", "No route to host",
                    "failed to lookup address information", "error sending request")
_PROXY_MARKERS = ("ProxyError", "407 Proxy Authentication", "Tunnel connection failed")
_TLS_MARKERS = ("SSLError", "CERTIFICATE_VERIFY_FAILED", "certificate verify failed",
                "invalid peer certificate", "UnknownIssuer")
_CONFLICT_MARKERS = ("ResolutionImpossible", "conflicting dependencies", "Cannot install",
                     "No solution found when resolving", "violate constraints")


def explain_install_failure(output: str, manual_command: str | None = None) -> str:
    """A message for a failed installation, from pip's (or uv's) output: offline, proxy, TLS
    interception, or a conflict with Slicer's own packages."""
    text = output or ""
    offline_help = ("Connect this computer to the internet and try again, or ask IT to install "
                    "the packages from a folder of wheels"
                    + (f" (add --no-index --find-links FOLDER to: {manual_command})"
                       if manual_command else "") + ".")
    if any(marker in text for marker in _PROXY_MARKERS):
        return ("pip could not get through the network proxy. Set HTTPS_PROXY (for example "
                "http://user:password@proxy:8080) before starting Slicer, then try again. "
                + offline_help)
    if any(marker in text for marker in _TLS_MARKERS):
        return ("pip could not verify the package server's certificate: the network probably "
                "inspects HTTPS traffic. Ask IT for the certificate and set PIP_CERT to its file "
                "before starting Slicer. " + offline_help)
    if any(marker in text for marker in _NETWORK_MARKERS):
        return "This computer seems to be offline: pip could not reach the package index. " + offline_help
    if any(marker in text for marker in _CONFLICT_MARKERS):
        return ("The packages need other versions of 3D Slicer's own SimpleITK, numpy or PyTorch, "
                "which this module never replaces. Install the newest 3D Slicer (5.10 or later) "
                "and try again.")
    if "No matching distribution found" in text or "Could not find a version" in text:
        return ("pip found no version of a package for this Python and system (or could not "
                "reach the index). " + offline_help)
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    return "Installing the packages failed" + (f": {last}" if last else ".") + \
        " The Python console shows pip's full output."


def gpu_advice(device_type: str, cuda_build: str | None) -> str | None:
    """What to tell a user whose work will run on the CPU, or None when a GPU will be used."""
    if device_type != "cpu":
        return None
    if cuda_build is None:
        return ("No GPU will be used: the installed PyTorch is a CPU-only build. If this computer "
                "has an NVIDIA GPU, reinstall PyTorch from the 'PyTorch Utils' module (it picks the "
                "CUDA build for your driver). On the CPU, segmentation takes minutes per CT and "
                "adaptation much longer; the 'fast' option helps.")
    return ("No GPU will be used: PyTorch (built for CUDA " + cuda_build + ") sees no NVIDIA GPU. "
            "Check the GPU driver (nvidia-smi), or work on the CPU: segmentation takes minutes "
            "per CT and adaptation much longer; the 'fast' option helps.")
