"""Whether this CPU computes bfloat16 natively (AMX or AVX-512 BF16), so that OpenVINO's bf16 path pays.

One method on every OS: OpenVINO's CPU plugin lists "BF16" in its OPTIMIZATION_CAPABILITIES
exactly when it has native bf16 kernels for the CPU (avx512_core_bf16 or AMX); it reads the
CPUID itself, so Linux, Windows and macOS answer alike. On a CPU without them (AVX2 only) it
lists FP32, INT8, BIN, EXPORT_IMPORT, and the bf16 hint would run f32 arithmetic anyway. Without
OpenVINO (then no OpenVINO backend runs at all) Linux's /proc/cpuinfo flags answer; elsewhere the
answer is "no", with the reason. Tests replace `openvino_capabilities` / `linux_cpu_flags`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo spelling
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Bf16Support:
    """`native`: bf16 arithmetic runs in hardware; `evidence`: how that was found, in words."""

    native: bool
    evidence: str

    @property
    def tag(self) -> str:
        """A short word for cache keys: a decision made on other hardware is not reused."""
        return "bf16" if self.native else "nobf16"


def openvino_capabilities() -> list[str] | None:
    """OpenVINO's CPU optimisation capabilities ("FP32", "BF16", ...), or None without OpenVINO."""
    try:
        import openvino as ov
        return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    except Exception:  # not installed, or no CPU plugin
        return None


def linux_cpu_flags() -> set[str] | None:
    """The CPU flags Linux reports, or None where there is no /proc/cpuinfo."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def detect_bf16() -> Bf16Support:
    capabilities = openvino_capabilities()
    if capabilities is not None:
        native = "BF16" in capabilities
        return Bf16Support(native, f"OpenVINO CPU capabilities: {', '.join(capabilities)}")
    flags = linux_cpu_flags()
    if flags is not None:
        found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
        return Bf16Support(bool(found), "CPU flags: " + (", ".join(found) or
                                                        "no amx_bf16 or avx512_bf16"))
    return Bf16Support(False, "unknown (OpenVINO is not installed and this OS has no /proc/cpuinfo)")
