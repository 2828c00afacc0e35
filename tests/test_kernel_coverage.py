"""Which ternary kernels ran here, visible in pytest's summary.

The Rust kernel tests skip a kernel this CPU cannot run with a note on stderr, which ``cargo test`` hides. Here
each kernel nanochat knows is one test: it runs the kernel through the extension against a plain numpy
``trits @ x`` when this CPU has the features, and is ``pytest.skip``ped with the missing CPU flags otherwise, so
``pytest -rs`` lists every kernel that was not exercised on this machine and why.

The CPU features are read from ``/proc/cpuinfo`` (the Linux kernel's view, independent of the extension's own
``is_x86_feature_detected!``): a kernel the CPU supports but the extension does not offer fails instead of
skipping quietly. A kernel the extension offers always runs, so the AVX-512 kernel can be exercised on a host
without AVX-512 under Intel SDE, which emulates CPUID (``sde64 -spr -- python -m pytest
tests/test_kernel_coverage.py``; not tried here). AMX also needs the OS's tile-data permission, which SDE cannot
obtain from a kernel on a host without AMX.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import numpy as np
import pytest

from nanochat import _core

# Every kernel nanochat's Rust core defines (rust/core/src/kernels/mod.rs, ALL_KERNELS) and the /proc/cpuinfo
# flags its runtime detection asks for (kernels/x86/mod.rs and x86/amx.rs).
KERNEL_FLAGS: dict[str, tuple[str, ...]] = {
    "scalar": (),
    "avx2_lut": ("avx2",),
    "avx2": ("avx2",),
    "avx512_vnni": ("avx512f", "avx512bw", "avx512_vnni"),
    "amx": ("avx512f", "avx512bw", "avx512_vnni", "gfni", "amx_tile", "amx_int8"),
}
X86 = platform.machine().lower() in ("x86_64", "amd64")

# (rows, cols, activation rows): one row, odd row counts, several blocks per row, and 16+ activation rows (the
# AMX tile path; below 16 it hands over to avx512_vnni)
SHAPES = [(1, 256, 1), (37, 768, 1), (50, 512, 3), (19, 256, 17), (64, 1024, 32)]


def cpu_flags() -> set[str]:
    """The first processor's flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def known_kernels() -> list[str]:
    """The kernel names this build of the extension knows, from its own error message for an unknown name."""
    with pytest.raises(ValueError, match=r"known: ") as info:
        _core.ternary_gemm_i32(np.zeros((1, 64), np.uint8), np.zeros((1, 256), np.int8), kernel="no-such-kernel")
    return [k.strip() for k in str(info.value).split("known: ", 1)[1].rstrip(")").split(",")]


def test_every_kernel_of_the_build_is_listed_here() -> None:
    """A kernel added to the Rust core needs its CPU flags above, or it would never show up as skipped."""
    known = known_kernels()
    assert known and set(known) <= set(KERNEL_FLAGS), known
    assert set(_core.available_kernels()) <= set(known)
    assert "scalar" in _core.available_kernels()


@pytest.mark.parametrize("kernel", list(KERNEL_FLAGS))
def test_kernel_runs_or_says_why_not(kernel: str) -> None:
    needs = KERNEL_FLAGS[kernel]
    if kernel not in _core.available_kernels():
        if kernel not in known_kernels():
            pytest.skip(f"kernel {kernel}: not in this build of nanochat._core")
        if not X86:
            pytest.skip(f"kernel {kernel}: an x86-64 kernel, this machine is {platform.machine()}")
        missing = [f for f in needs if f not in cpu_flags()]
        if missing:
            pytest.skip(f"kernel {kernel}: this CPU lacks {', '.join(missing)}; its Rust and Python tests skip it")
        pytest.fail(f"the CPU has {', '.join(needs)} but the extension does not offer kernel {kernel}")
    rng = np.random.default_rng(0)
    for rows, cols, n in SHAPES:
        trits = rng.integers(-1, 2, (rows, cols)).astype(np.int8)
        packed, scale = _core.tq2_0_to_kernel_layout(_core.pack_tq2_0(trits, 0.25))
        assert scale == 0.25
        x = rng.integers(-127, 128, (n, cols)).astype(np.int8)
        want = x.astype(np.int64) @ trits.T.astype(np.int64)  # (n, rows)
        for threads in (1, 2):
            got = _core.ternary_gemm_i32(packed, x, kernel=kernel, threads=threads)
            np.testing.assert_array_equal(got, want, err_msg=f"{kernel} {rows}x{cols} n={n} threads={threads}")
