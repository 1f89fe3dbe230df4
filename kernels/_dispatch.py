"""Choosing between a Triton kernel and its torch reference, and jitting kernels lazily.

Triton is optional: `import vllm_compact.kernels` works without triton and without a GPU. Kernel bodies are
plain functions, jitted on first launch (cached per mode: compiled, or interpreted under TRITON_INTERPRET=1).
The interpreter also needs TRITON_INTERPRET set before triton is imported (triton's own library functions are
jitted at import), which is why tests/kernels runs its interpreter tests in a subprocess.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable

import torch

TRITON_ENV = "VLLM_COMPACT_TRITON"  # "1": force Triton (CPU tests under TRITON_INTERPRET=1), "0": force torch


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install (missing driver libraries)
        return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the Triton version of a kernel should run for these inputs."""
    forced = os.environ.get(TRITON_ENV)
    if forced == "0" or not triton_available():
        return False
    if forced == "1":
        return True
    return all(t.is_cuda for t in tensors if t is not None)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _jit_cached(fn: Callable[..., Any], interpret: bool) -> Any:
    import triton

    return triton.jit(fn)


def jit(fn: Callable[..., Any]) -> Any:
    """The jitted kernel for `fn` in the current mode (compiled or interpreted)."""
    return _jit_cached(fn, interpreting())


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Grid size: ceil(a / b), at least 1 (a launch over zero elements still gets one guarded program)."""
    return max(1, -(-int(a) // int(b)))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (TF32 would cost ~1e-3 relative in logits)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreter_safe(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16 -> float32 under the Triton interpreter, whose tl.dot misreads bf16 (numpy has no bfloat16)."""
    if tensor.dtype == torch.bfloat16 and interpreting():
        return tensor.float()
    return tensor
