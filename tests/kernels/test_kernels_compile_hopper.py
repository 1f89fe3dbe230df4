"""Every Triton kernel compiles for Hopper (sm_90) through the real compiler (ptxas included), with no GPU here.

The interpreter tests check the kernels' arithmetic; this checks what only the compiler sees (types of loop-
carried values, dot shapes and precisions, constexpr branches). The launchers run on CPU tensors with `jit`
swapped for a compile-only stand-in, against a stand-in CUDA driver that names an sm_90 target.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from vllm_compact.kernels.compact_attention import compact_attention_triton  # noqa: E402
from vllm_compact.kernels.key_scores import key_scores_triton  # noqa: E402
from vllm_compact.kernels.lstsq import value_lstsq_triton  # noqa: E402
from vllm_compact.kernels.nnls import nnls_pg_triton  # noqa: E402

KERNEL_MODULES = ["key_scores", "nnls", "lstsq", "compact_attention"]


class HopperTargetDriver:
    """Just enough of a CUDA driver for JITFunction.warmup to pick a target and compile."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class CompileOnly:
    """Stands in for a jitted kernel: `kernel[grid](*args)` compiles (warmup) and records the result."""

    def __init__(self, fn: Any, compiled: list[tuple[str, bytes]]):
        self.kernel = triton.jit(fn)  # a fresh JITFunction: nothing compiled here lands in shared caches
        self.compiled = compiled

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kernel = self.kernel.warmup(*args, grid=grid, **kwargs)
            self.compiled.append((kernel.name, kernel.asm["cubin"]))

        return launch


@pytest.fixture
def compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bytes]]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the interpreter replaces compilation")
    compiled: list[tuple[str, bytes]] = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"vllm_compact.kernels.{name}")
        monkeypatch.setattr(module, "jit", lambda fn: CompileOnly(fn, compiled))
    previous = getattr(driver, "_active", None)  # None: not created yet (reset_active would need a real GPU)
    driver.set_active(HopperTargetDriver())
    yield compiled
    driver.set_active(previous)


def test_all_kernels_compile_for_sm90(compiled_kernels):
    # key_scores in both operand types (bf16 tensor-core dots, fp32 exact FMA dots); the rest in its usual dtype.
    for dtype in (torch.bfloat16, torch.float32):
        q, k = torch.randn(2, 100, 64).to(dtype), torch.randn(2, 130, 64).to(dtype)
        positions = dict(query_pos=torch.zeros(2, 100, dtype=torch.long), key_pos=torch.zeros(2, 130, dtype=torch.long))
        key_scores_triton(q, k, 0.1, key_bias=torch.randn(2, 130), reduce="rms", **positions)
    compact_attention_triton(
        torch.randn(3, 14, 64).bfloat16(), torch.randn(10, 32, 2, 64).bfloat16(), torch.randn(400),
        torch.zeros(2, 5, dtype=torch.int32), torch.tensor([0, 200]), torch.zeros(2, 2, dtype=torch.int32),
        torch.ones(2, 2, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), 0.125,
    )
    M = torch.rand(2, 50, 300)
    nnls_pg_triton(M, torch.rand(2, 50), lower=0.05, upper=20.0, row_mask=torch.ones(2, 50, dtype=torch.bool))
    value_lstsq_triton(M, torch.rand(2, 50, 64))
    names = {name for name, _ in compiled_kernels}
    assert names == {"_lse_pass", "_score_pass", "_compact_attention_kernel", "_transposed_product",
                     "_projected_gradient"}
    assert all(len(cubin) > 0 for _, cubin in compiled_kernels)
