"""First use inside Slicer: which Python packages are missing, and how to install them safely.

Only the standard library is imported here: this runs before anything else is installed.

The plan: PyTorch through the PyTorch extension's PyTorchUtils (it picks the build that matches
the GPU and driver) within the torch range nnU-Net accepts, then the rest with pip under a
constraints file that pins the SimpleITK and numpy Slicer already has (and the torch PyTorchUtils
chose), so pip can never replace them. peft (LoRA only) is installed separately, when LoRA is
chosen. The widget asks the user, then `run_installation` runs the plan with PyTorchUtils and
`run_pip` injected; everything here is testable without Slicer, per platform.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
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


# The torch versions nnunetv2 2.8.1 accepts ("torch!=2.9.*,>=2.1.2" in its metadata), from the
# lowest this project declares (pyproject.toml); passed to PyTorchUtils' installTorch, which
# appends it to "torch" (SlicerPyTorch PyTorchUtils.py, _getPipInstallArguments).
TORCH_REQUIREMENT = ">=2.2,!=2.9.*"
# The nnU-Net versions this project is tested with; another one (installed by the NNUNet or
# TotalSegmentator extension, say) is offered to be replaced, never used silently.
NNUNET_TESTED = "==2.8.1"

REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", "torch" + TORCH_REQUIREMENT, "pytorchutils", "PyTorch (neural networks)"),
    Requirement("nnunetv2", "nnunetv2" + NNUNET_TESTED, "pip", "nnU-Net v2 (segmentation and training)"),
    Requirement("scipy", "scipy>=1.10", "pip", "node measurements"),
    Requirement("tqdm", "tqdm>=4.66", "pip", "progress reporting"),
    Requirement("matplotlib", "matplotlib>=3.7", "pip", "adaptation curves and reports"),
    Requirement("psutil", "psutil>=5.9", "pip", "stopping background jobs with all their processes"),
    Requirement("safetensors", "safetensors>=0.4", "pip", "site adapters (an adaptation as a small file)"),
    Requirement("peft", "peft==0.21.2", "pip", "the LoRA adaptation method", optional=True),
    Requirement("openvino", 'openvino==2026.4.1; sys_platform != "darwin" or platform_machine == "arm64"', "pip",
                "faster segmentation on the CPU (OpenVINO backend)", optional=True),
    Requirement("nncf", 'nncf==3.4.0; sys_platform != "darwin" or platform_machine == "arm64"', "pip",
                "INT8 segmentation on the CPU, once checked against fp32 (OpenVINO INT8 backend)",
                optional=True),
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


def platform_problem(system: str | None = None, machine: str | None = None) -> str | None:
    """A message when this computer cannot run the core inside Slicer, else None.

    Intel macOS: PyTorch's last x86_64 macOS wheel is 2.2.2 (pip resolves nothing newer for
    macosx_*_x86_64), built against numpy 1.x (torch 2.3 was the first built for numpy 2), and 3D
    Slicer 5.10 ships numpy 2.0.2 (SuperBuild/External_python-numpy.cmake line 43), which this
    module never replaces. (imagecodecs is not the obstacle: its 2026.10.10 has an x86_64 wheel.)
    """
    system = platform.system() if system is None else system
    machine = platform.machine() if machine is None else machine
    if system == "Darwin" and machine.lower() in ("x86_64", "amd64", "i386"):
        return ("LymphNodeDGST cannot run in 3D Slicer on an Intel Mac (or in the Intel build of "
                "Slicer under Rosetta): PyTorch's last build for Intel Macs needs numpy 1.x, but "
                "Slicer 5.10 ships numpy 2, which this module never replaces. On an Apple-silicon "
                "Mac, install the Apple-silicon build of 3D Slicer; otherwise use a Linux or "
                "Windows computer.")
    return None


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.9.1+cu121" -> (2, 9, 1); () if none."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def version_satisfies(version: str, specifier: str) -> bool:
    """Whether `version` meets `specifier` (comma-separated ==, !=, >=, <=, >, <, with .* on ==
    and !=), compared on the numeric release; the standard library only (no `packaging`)."""
    have = release(version)
    for clause in filter(None, (part.strip() for part in specifier.split(","))):
        match = re.fullmatch(r"(==|!=|>=|<=|>|<)\s*([0-9.]+?)(\.\*)?", clause)
        if not match or not have:
            raise ValueError(f"unsupported version clause {clause!r} for {version!r}")
        operator, wanted, wildcard = match.group(1), release(match.group(2)), match.group(3)
        if wildcard:
            equal = have[:len(wanted)] == wanted
            ok = equal if operator == "==" else (not equal if operator == "!=" else None)
            if ok is None:
                raise ValueError(f"unsupported version clause {clause!r}")
        else:
            width = max(len(have), len(wanted))
            a, b = have + (0,) * (width - len(have)), wanted + (0,) * (width - len(wanted))
            ok = {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b,
                  "<": a < b}[operator]
        if not ok:
            return False
    return True


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
    platform_problem: str | None = None
    installed: Mapping[str, str] = field(default_factory=dict)  # torch, nnunetv2 versions found

    @property
    def torch_incompatible(self) -> str | None:
        """The installed torch version when nnU-Net refuses it (2.9.x, say), else None."""
        found = self.installed.get("torch")
        return found if found and not version_satisfies(found, TORCH_REQUIREMENT) else None

    @property
    def nnunet_untested(self) -> str | None:
        """The installed nnunetv2 version when this project is not tested with it, else None."""
        found = self.installed.get("nnunetv2")
        return found if found and not version_satisfies(found, NNUNET_TESTED) else None

    @property
    def install_torch(self) -> bool:
        return bool(self.torch_incompatible) or any(r.source == "pytorchutils" for r in self.missing)

    @property
    def pip_requirements(self) -> list[str]:
        """Required pip packages to install (optional ones are installed when chosen)."""
        specifiers = [r.specifier for r in self.missing if r.source == "pip" and not r.optional]
        if self.nnunet_untested:
            specifiers.insert(0, "nnunetv2" + NNUNET_TESTED)
        return specifiers

    @property
    def slicer_missing(self) -> list[str]:
        return [r.module for r in self.missing if r.source == "slicer"]

    @property
    def nothing_to_do(self) -> bool:
        return self.ready and not self.missing

    @property
    def ready(self) -> bool:
        """Everything the core needs is there in versions it works with (optional packages may
        be missing)."""
        return (self.blocker() is None and all(r.optional for r in self.missing)
                and not self.torch_incompatible and not self.nnunet_untested)

    def status_text(self) -> str:
        """One paragraph for the First use section."""
        if self.nothing_to_do:
            return "All required Python packages are installed."
        if self.ready:
            return ("Ready. Optional, for the LoRA adaptation method only (installed when you "
                    "choose it): " + ", ".join(r.module for r in self.missing) + ".")
        if self.blocker():
            return self.blocker()
        problems = []
        required = [r.module for r in self.missing if not r.optional]
        if required:
            problems.append("Missing Python packages: " + ", ".join(required) + ".")
        if self.torch_incompatible:
            problems.append(f"PyTorch {self.torch_incompatible} is installed, but nnU-Net needs "
                            f"torch{TORCH_REQUIREMENT}: it must be reinstalled.")
        if self.nnunet_untested:
            problems.append(f"nnU-Net {self.nnunet_untested} is installed (perhaps by another "
                            f"extension); LymphNodeDGST is tested with nnunetv2{NNUNET_TESTED} "
                            "and does not run on another version.")
        return " ".join(problems) + " Install them below."

    def blocker(self) -> str | None:
        """Why the plan cannot be run from the module at all, or None."""
        if self.python_problem:
            return self.python_problem
        if self.platform_problem:
            return self.platform_problem
        if self.slicer_missing:
            return (f"3D Slicer's own {', '.join(self.slicer_missing)} cannot be found; these ship "
                    "with Slicer and are never installed by this module: reinstall 3D Slicer.")
        if self.install_torch and not self.pytorch_utils_available:
            return ("PyTorch is missing or in a version nnU-Net refuses, and the PyTorch extension "
                    "(which installs the PyTorch build that fits this computer's GPU) is missing: "
                    "install the 'PyTorch' extension from the Extensions Manager, restart Slicer, "
                    "and come back here.")
        return None

    def pip_arguments(self, constraints_path: str | Path,
                      requirements: Sequence[str] | None = None) -> list[str]:
        """Arguments for `pip install` (the required packages unless `requirements` is given)."""
        return ["--constraint", str(constraints_path),
                *(self.pip_requirements if requirements is None else requirements)]

    def manual_command(self, constraints_path: str | Path,
                       requirements: Sequence[str] | None = None) -> str:
        """The same installation as a command line, for IT staff or an offline wheel folder."""
        return "PythonSlicer -m pip install " + " ".join(
            f'"{part}"' if " " in part or any(c in part for c in "<>!*") else part
            for part in self.pip_arguments(constraints_path, requirements))

    def confirmation_text(self) -> str:
        lines = ["LymphNodeDGST needs these Python packages, which are not installed yet "
                 "(or not in a version it works with):"]
        lines += [f"- {r.module} ({r.purpose})" for r in self.missing
                  if r.source != "slicer" and not r.optional]
        if self.torch_incompatible:
            lines.append(f"- torch: {self.torch_incompatible} is replaced by a version "
                         f"{TORCH_REQUIREMENT} (nnU-Net refuses {self.torch_incompatible}); "
                         "other extensions that use PyTorch use the new one too.")
        if self.nnunet_untested:
            lines.append(f"- nnunetv2: {self.nnunet_untested} is replaced by the tested "
                         f"nnunetv2{NNUNET_TESTED}; other extensions that use nnU-Net (NNUNet, "
                         "TotalSegmentator) use it too.")
        if self.install_torch:
            lines.append("PyTorch is installed by the PyTorch extension (the build that fits this "
                         "computer's GPU).")
        if self.pip_requirements:
            lines.append("The others are installed with pip from the internet (several hundred "
                         "MB; a few minutes). Slicer's own SimpleITK and numpy are kept as they are.")
        lines.append("Install now?")
        return "\n".join(lines)


def plan_installation(pytorch_utils_available: bool,
                      find_spec: Callable[[str], object] = importlib.util.find_spec,
                      version_info: Sequence[int] = tuple(sys.version_info),
                      include_optional: bool = True, system: str | None = None,
                      machine: str | None = None,
                      version: Callable[[str], str] = importlib.metadata.version) -> InstallPlan:
    """What to install on this computer (`system`/`machine` as platform.system()/.machine())."""
    missing = tuple(missing_requirements(find_spec, include_optional))
    absent = {r.module for r in missing}
    installed = {name: found for name, found in installed_versions(("torch", "nnunetv2"), version).items()
                 if name not in absent}
    return InstallPlan(python_problem(version_info), missing, pytorch_utils_available,
                       platform_problem(system, machine), installed)


LORA_REQUIREMENT = next(r for r in REQUIREMENTS if r.module == "peft")


def lora_missing(find_spec: Callable[[str], object] = importlib.util.find_spec) -> bool:
    """Whether the LoRA method's optional package (peft) still has to be installed."""
    return bool(missing_requirements(lambda m: find_spec(m) if m == "peft" else object()))


def failure_output(error: BaseException) -> str:
    """The installer's output carried by an exception, as text.

    Slicer 5.10's pip_install and PyTorchUtils' installTorch raise CalledProcessError with
    `output=proc.stdout`, the already consumed pipe (a stream, not text; util.py line 3954, after
    logProcessOutput printed every line to the console): only str and bytes are taken.
    """
    parts = []
    for name in ("output", "stderr"):
        value = getattr(error, name, None)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, str) and value:
            parts.append(value)
    return "\n".join(parts) or str(error)


@dataclass(frozen=True)
class PipResult:
    returncode: int
    output: str  # stdout and stderr, as pip printed them


def run_pip(arguments: Sequence[str], python: str, on_line: Callable[[str], None] = print,
            env: Mapping[str, str] | None = None) -> PipResult:
    """`python -m pip install ARGUMENTS`, its output passed on line by line (to Slicer's console
    in the module) and kept, so that a failure can be explained from pip's own words."""
    options: dict = {}
    if os.name == "nt":  # no console window (as slicer.util.launchConsoleProcess does)
        startup = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
        startup.dwFlags, startup.wShowWindow = 1, 0
        options["startupinfo"] = startup
    command = [python, "-m", "pip", "install", "--disable-pip-version-check", *arguments]
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, text=True, encoding="utf-8",
                                   errors="replace", env=None if env is None else dict(env),
                                   **options)
    except OSError as error:
        return PipResult(127, f"could not run {python}: {error}")
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        on_line(line.rstrip())
    return PipResult(process.wait(), "".join(lines))


@dataclass
class InstallReport:
    """What an installation did: steps done, and the failure (message, details) if any."""

    done: list[str] = field(default_factory=list)
    failure: tuple[str, str] | None = None
    declined: bool = False

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.declined


def run_installation(plan: InstallPlan, install_torch: Callable[[str], object | None],
                     pip: Callable[[list[str]], PipResult], constraints_path: str | Path) -> InstallReport:
    """Run `plan`: torch through `install_torch(TORCH_REQUIREMENT)` (PyTorchUtils' installTorch,
    None when the user declined), then the constraints (pinning the torch now installed), then
    the required pip packages in one `pip(arguments)` call. Never raises for a failed step."""
    report = InstallReport()
    if plan.blocker():
        report.failure = (plan.blocker() or "", "")
        return report
    if plan.install_torch:
        try:
            if install_torch(TORCH_REQUIREMENT) is None:
                report.declined = True
                return report
        except Exception as error:  # CalledProcessError from ltt/pip, or PyTorchUtils' own
            output = failure_output(error)
            report.failure = ("Installing PyTorch failed. " + explain_install_failure(output),
                              output)
            return report
        report.done.append("PyTorch")
    if plan.pip_requirements:
        write_constraints(constraints_path)
        result = pip(plan.pip_arguments(constraints_path))
        if result.returncode != 0:
            report.failure = (explain_install_failure(result.output, plan.manual_command(constraints_path)),
                              result.output)
            return report
        report.done += plan.pip_requirements
    return report


def install_optional(requirement: Requirement, pip: Callable[[list[str]], PipResult],
                     constraints_path: str | Path) -> InstallReport:
    """One optional package (peft for LoRA) in its own pip call, under the same constraints: its
    failure leaves every required package as it was."""
    report = InstallReport()
    write_constraints(constraints_path)
    arguments = ["--constraint", str(constraints_path), requirement.specifier]
    result = pip(arguments)
    if result.returncode != 0:
        manual = "PythonSlicer -m pip install " + " ".join(f'"{a}"' if "=" in a else a for a in arguments)
        report.failure = (f"Installing {requirement.module} ({requirement.purpose}) failed; every "
                          "other method still works. " + explain_install_failure(result.output, manual),
                          result.output)
    else:
        report.done.append(requirement.specifier)
    return report


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
