"""Process-level settings that make CPU training faster (applied by the ``lit-qft`` entry point)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_glibc_allocator() -> bool:
    """Stop glibc from returning large blocks to the OS after every step.

    With default settings each large activation is a fresh ``mmap`` and ``munmap``, and the page
    faults cost up to 1.6x in training speed on CPU (measured in ``benchmarks/``). Same as setting
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``. Returns True when applied;
    ``LIT_QFT_TUNE_MALLOC=0`` turns it off.
    """
    if os.environ.get("LIT_QFT_TUNE_MALLOC", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**30))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (elsewhere bf16 is emulated, ~100x slower).

    CUDA: a GPU with bf16 (Ampere and later). CPU: AVX-512 BF16 or AMX; an AVX2-only CPU runs a
    bf16 matmul at ~1 % of its fp32 rate (measured in ``benchmarks/``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def default_precision() -> str:
    """``lit-qft fit``'s default ``--trainer.precision``: bf16-mixed where the device that trains has native
    bf16 (1.58-1.81x fp32 on GPT-2 small on AVX-512 BF16 CPUs; fp32 master weights either way), else 32-true.

    ``LIT_QFT_DEFAULT_PRECISION`` sets it instead (the test suite pins 32-true so it checks the same
    numbers on every machine)."""
    if os.environ.get("LIT_QFT_DEFAULT_PRECISION"):
        return os.environ["LIT_QFT_DEFAULT_PRECISION"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16-mixed" if native_bf16(device) else "32-true"
