"""What this machine's matrix units are, decided once: the training dtype, and the peak it is measured against.

Notable choices:
- CPU features come from ``/proc/cpuinfo``'s flags, confirmed by torch's own runtime probe for AMX (which also
  checks that the OS grants the tile state). Nothing is assumed from the model name.
- bf16 is chosen on a CPU only where it runs on a bf16 matrix unit: AMX-BF16 (``amx_bf16``: 1,024 FLOP/cycle/core,
  16× AVX-512 fp32 FMA) or AVX512-BF16 (``vdpbf16ps``: 2× fp32). Without one, bf16 matmuls are emulated and fp32
  is faster, so fp32 stays. On CUDA, bf16 where the device supports it.
- The peak is FLOP/cycle/core × the CPU's clock (``cpu MHz``, else the sysfs maximum) × threads. It is a
  theoretical ceiling for the percentage column of the benchmarks, not a promise.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# FLOP per cycle per core of the widest matrix path for each dtype (FMA = 2 FLOP).
FLOP_PER_CYCLE = {
    "amx_bf16": 1024,  # AMX TMUL: 16x32 bf16 tile ops, 1,024 FLOP/cycle
    "avx512_bf16": 128,  # vdpbf16ps: 16 fp32 lanes x 2 products x 2 FLOP x 2 ports
    "avx512f": 64,  # fp32 FMA: 16 lanes x 2 FLOP x 2 ports
    "avx2": 32,  # fp32 FMA: 8 lanes x 2 FLOP x 2 ports
    "scalar": 4,
}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_amx_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "amx_bf16" in cpu_flags() and (probe is None or bool(probe()))


def has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_flags()


@functools.lru_cache(maxsize=1)
def cpu_mhz() -> float:
    """The clock the peak is computed at: /proc/cpuinfo's ``cpu MHz``, else sysfs's maximum, else 2,000."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000.0
    except (OSError, ValueError):
        return 2000.0


@dataclass(frozen=True)
class MatrixUnit:
    """The matrix path a dtype runs on here and its peak."""

    name: str  # amx_bf16 | avx512_bf16 | avx512f | avx2 | scalar | cuda
    flop_per_cycle_core: int
    mhz: float
    threads: int

    @property
    def peak_flops(self) -> float:
        return self.flop_per_cycle_core * self.mhz * 1e6 * self.threads


def cpu_matrix_unit(dtype: torch.dtype, threads: int | None = None) -> MatrixUnit:
    """The CPU unit ``dtype`` matmuls run on, with the peak for ``threads`` cores (default: torch's threads)."""
    flags = cpu_flags()
    if dtype == torch.bfloat16 and has_amx_bf16():
        name = "amx_bf16"
    elif dtype == torch.bfloat16 and has_avx512_bf16():
        name = "avx512_bf16"
    elif "avx512f" in flags:
        name = "avx512f"
    elif "avx2" in flags and "fma" in flags:
        name = "avx2"
    else:
        name = "scalar"
    return MatrixUnit(name, FLOP_PER_CYCLE[name], cpu_mhz(), threads or torch.get_num_threads())


def choose_dtype(device: torch.device, requested: str = "auto") -> tuple[torch.dtype, str]:
    """The training compute dtype for ``device`` and why: ``requested`` wins unless it is ``"auto"``."""
    if requested not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {requested!r}")
    if requested != "auto":
        return (torch.float32 if requested == "float32" else torch.bfloat16), f"--dtype {requested}"
    if os.environ.get("NANOCHAT_DTYPE") in ("float32", "bfloat16"):
        req = os.environ["NANOCHAT_DTYPE"]
        return (torch.float32 if req == "float32" else torch.bfloat16), f"NANOCHAT_DTYPE={req}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device supports bf16"
        return torch.float32, "CUDA device without bf16"
    if device.type == "cpu":
        if has_amx_bf16():
            return torch.bfloat16, "CPU has AMX-BF16 (amx_bf16): bf16 matmuls run on AMX tiles, 16x fp32 FMA"
        if has_avx512_bf16():
            return torch.bfloat16, "CPU has AVX512-BF16 (vdpbf16ps): 2x fp32 FMA"
        return torch.float32, "CPU has no bf16 matrix unit (no amx_bf16/avx512_bf16): fp32 is faster"
    return torch.float32, f"device {device.type}: float32"


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring, for MFU on a GPU.
CUDA_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def cuda_matrix_unit() -> MatrixUnit:
    """The current CUDA device's bf16 peak as a :class:`MatrixUnit` (``mhz`` is 1 and FLOP/cycle the peak in MFLOP
    so that ``peak_flops`` comes out right); an unknown device raises, rather than report a made-up MFU."""
    name = torch.cuda.get_device_name()
    for key, tflops in CUDA_BF16_TFLOPS.items():
        if key in name:
            return MatrixUnit(f"cuda ({name})", int(tflops * 1e6), 1.0, 1)
    raise ValueError(f"no bf16 peak known for {name!r}: add it to nanochat.hardware.CUDA_BF16_TFLOPS")
