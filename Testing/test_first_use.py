"""First use inside Slicer, without Slicer: the install plan per platform and installed versions,
pip run by us with its output kept, PyTorch through PyTorchUtils with nnU-Net's torch range, peft
on its own, and failures raised in exactly the shape Slicer 5.10 raises them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from LymphNodeDGSTLib.slicer_bridge import dependencies as deps

ALL_MODULES = {r.module for r in deps.REQUIREMENTS}
NO_SUCH_PACKAGE = "lndgst-no-such-package-for-tests==1.0"


def find_spec_without(*absent: str):
    return lambda module: None if module in absent else object()


def versions(**found: str):
    def version(name: str) -> str:
        if name in found:
            return found[name]
        raise deps.importlib.metadata.PackageNotFoundError(name)
    return version


def plan(absent=(), system="Linux", machine="x86_64", **found) -> deps.InstallPlan:
    found = {"torch": "2.14.1", "nnunetv2": "2.8.1", **found}
    return deps.plan_installation(True, find_spec_without(*absent), (3, 12, 0), system=system,
                                  machine=machine, version=versions(**found))


def slicer_5_10_execute_python_module(args: list[str]) -> None:
    """Slicer 5.10.0's `_executePythonModule` as pip_install and PyTorchUtils' installTorch use it
    (Base/Python/slicer/util.py 3879-3954): Popen with stdout=PIPE, stderr=STDOUT, text mode;
    logProcessOutput prints and consumes every line, waits, then raises
    CalledProcessError(retcode, proc.args, output=proc.stdout, stderr=proc.stderr): `output` is
    the consumed pipe object, `stderr` None."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)
    while True:
        line = proc.stdout.readline()
        if not line:
            break
        print(line.rstrip())
    proc.wait()
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, output=proc.stdout,
                                            stderr=proc.stderr)


def recording_pip(returncode: int = 0, output: str = ""):
    calls: list[list[str]] = []

    def pip(arguments: list[str]) -> deps.PipResult:
        calls.append(list(arguments))
        return deps.PipResult(returncode, output)
    return pip, calls


def test_a_failure_in_slicer_5_10s_exception_shape_is_explained_not_crashed(tmp_path):
    """Catches: reading CalledProcessError.output as text when Slicer 5.10 put the consumed pipe
    there (the old failure_output called .decode on it: AttributeError inside the except block,
    no dialog)."""
    with pytest.raises(subprocess.CalledProcessError) as caught:
        slicer_5_10_execute_python_module(["pip", "install", "--no-index", "--disable-pip-version-check",
                                           NO_SUCH_PACKAGE])
    error = caught.value
    assert not isinstance(error.output, (str, bytes)) and error.stderr is None  # 5.10's shape
    text = deps.failure_output(error)
    assert "returned non-zero exit status" in text

    def install_torch(requirement):  # PyTorchUtils' installTorch fails the same way
        slicer_5_10_execute_python_module(["pip", "install", "--no-index", NO_SUCH_PACKAGE])

    pip, calls = recording_pip()
    report = deps.run_installation(plan(absent=("torch",)), install_torch, pip, tmp_path / "c.txt")
    assert report.failure and report.failure[0].startswith("Installing PyTorch failed.")
    assert calls == []  # nnU-Net is not installed without torch


def test_pip_is_run_by_us_and_its_output_reaches_the_diagnosis(tmp_path):
    """Catches: losing pip's text (as slicer.util.pip_install does), which leaves the
    offline/proxy/conflict diagnosis with nothing to read."""
    lines: list[str] = []
    result = deps.run_pip(["--no-index", NO_SUCH_PACKAGE], sys.executable, on_line=lines.append)
    assert result.returncode != 0
    assert "No matching distribution found" in result.output and lines
    assert "".join(line + "\n" for line in lines) == result.output.replace("\r\n", "\n")

    missing_nnunet = plan(absent=("nnunetv2",))
    report = deps.run_installation(
        missing_nnunet, lambda requirement: pytest.fail("torch is installed"),
        lambda arguments: deps.run_pip(["--no-index", *arguments[:2], NO_SUCH_PACKAGE],
                                       sys.executable, on_line=lambda line: None),
        tmp_path / "c.txt")
    message, details = report.failure
    assert "found no version" in message and "--no-index --find-links FOLDER" in message
    assert "No matching distribution found" in details
    assert deps.run_pip(["x"], str(tmp_path / "no-python")).returncode == 127


def test_version_ranges_agree_with_pip_s_own_rules():
    """Catches a wrong hand-written version comparison (2.9.1 accepted, 2.10 read as < 2.9,
    local versions like +cu121 mishandled), with `packaging` as the oracle."""
    candidates = ["2.1.2", "2.2.0", "2.2.2", "2.8.0", "2.8.1", "2.8.1+cu121", "2.9.0", "2.9.1+cu128",
                  "2.10.0", "2.14.1", "3.0", "2.5.1.post1"]
    for specifier in (deps.TORCH_REQUIREMENT, deps.NNUNET_TESTED, ">=2.1.2,!=2.9.*", "<2.9", "==2.8.*"):
        for version in candidates:
            expected = SpecifierSet(specifier).contains(version, prereleases=True)
            assert deps.version_satisfies(version, specifier) == expected, (version, specifier)
    # nnunetv2 2.8.1's own torch requirement holds for every version ours accepts.
    assert all(SpecifierSet(">=2.1.2,!=2.9.*").contains(v) for v in candidates
               if deps.version_satisfies(v, deps.TORCH_REQUIREMENT))


def test_torch_nnunet_refuses_is_reinstalled_through_pytorchutils_with_the_requirement(tmp_path):
    """Catches: calling installTorch without torchVersionRequirement (it would keep or pick a torch
    nnU-Net refuses), installing nnU-Net before torch, and treating torch 2.9 as ready."""
    old = plan(torch="2.9.1+cu128")
    assert not old.ready and old.install_torch and old.torch_incompatible == "2.9.1+cu128"
    assert "2.9.1+cu128" in old.status_text() and "reinstalled" in old.status_text()
    assert "2.9.1+cu128 is replaced" in old.confirmation_text()
    order: list[str] = []

    def install_torch(requirement):
        order.append(f"torch{requirement}")
        return object()

    pip, calls = recording_pip()

    def pip_after_torch(arguments):
        order.append("pip")
        return pip(arguments)

    with_nnunet_missing = deps.InstallPlan(None, (next(r for r in deps.REQUIREMENTS if r.module == "nnunetv2"),),
                                           True, None, {"torch": "2.9.1"})
    report = deps.run_installation(with_nnunet_missing, install_torch, pip_after_torch, tmp_path / "c.txt")
    assert report.ok and order == ["torch>=2.2,!=2.9.*", "pip"] and calls[0][-1] == "nnunetv2==2.8.1"
    # PyTorchUtils appends the requirement to "torch" (_getPipInstallArguments): a valid requirement.
    assert str(Requirement("torch" + deps.TORCH_REQUIREMENT).specifier) == "!=2.9.*,>=2.2"
    assert (tmp_path / "c.txt").is_file()  # constraints written after torch, pinning it

    declined, calls = deps.run_installation(old, lambda r: None, pip, tmp_path / "d.txt"), []
    assert declined.declined and not declined.ok and calls == []
    assert plan().ready and not plan().install_torch


def test_an_untested_nnunet_is_never_used_silently_and_the_tested_one_is_offered():
    """Catches: accepting whichever nnunetv2 another extension installed (2.5 here)."""
    other = plan(nnunetv2="2.5.0")
    assert not other.ready and other.nnunet_untested == "2.5.0"
    assert other.pip_requirements[0] == "nnunetv2==2.8.1"
    assert "2.5.0" in other.status_text() and "tested with nnunetv2==2.8.1" in other.status_text()
    assert "TotalSegmentator" in other.confirmation_text()
    assert not plan(nnunetv2="2.8.1").nnunet_untested


def test_peft_is_installed_alone_and_its_failure_leaves_the_rest_working(tmp_path):
    """Catches: peft in the same pip call as nnU-Net (a LoRA-stack conflict would then stop the
    required install), and a peft failure that marks the module not ready."""
    both = plan(absent=("nnunetv2", "peft"))
    assert both.pip_requirements == ["nnunetv2==2.8.1"]
    pip, calls = recording_pip()
    assert deps.run_installation(both, lambda r: pytest.fail("torch is there"), pip, tmp_path / "c.txt").ok
    assert len(calls) == 1 and not any(a.startswith("peft") for a in calls[0])

    after = plan(absent=("peft",))
    assert after.ready and "LoRA" in after.status_text()
    assert deps.lora_missing(find_spec_without("peft")) and not deps.lora_missing(find_spec_without())
    failing, calls = recording_pip(1, "ERROR: ResolutionImpossible")
    report = deps.install_optional(deps.LORA_REQUIREMENT, failing, tmp_path / "p.txt")
    assert calls == [["--constraint", str(tmp_path / "p.txt"), "peft==0.21.2"]]
    assert "every other method still works" in report.failure[0] and report.failure[1]
    assert after.ready  # nothing about the required packages changed


@pytest.mark.parametrize("system, machine, refused", [
    ("Darwin", "x86_64", True), ("Darwin", "arm64", False), ("Linux", "x86_64", False),
    ("Linux", "aarch64", False), ("Windows", "AMD64", False)])
def test_install_plan_per_platform(system, machine, refused):
    """Catches: offering an install on Intel macOS that cannot work (torch 2.2.2 needs numpy 1.x;
    Slicer 5.10 ships numpy 2.0.2)."""
    p = plan(absent=("torch", "nnunetv2"), system=system, machine=machine)
    if refused:
        assert not p.ready and "Intel Mac" in p.blocker() and p.status_text() == p.blocker()
        assert deps.run_installation(p, lambda r: pytest.fail("nothing to install"),
                                     lambda a: pytest.fail("nothing to install"), Path("unused")).failure
    else:
        assert p.blocker() is None and p.install_torch and p.pip_requirements == ["nnunetv2==2.8.1"]
