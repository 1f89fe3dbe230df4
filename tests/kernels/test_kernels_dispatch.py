"""Choosing Triton or torch, and importing the package without triton."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_compact.kernels._dispatch import TRITON_ENV, triton_available, use_triton

REPO_ROOT = Path(__file__).resolve().parents[2]

WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
import vllm_compact.kernels as K
from vllm_compact.kernels._dispatch import triton_available
assert not triton_available()
q, k = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
s = K.key_scores(q, k, 0.5)
assert s.scores.shape == (2, 5) and torch.isfinite(s.lse).all()
w = K.nnls_pg(torch.rand(2, 6, 3), torch.rand(2, 6), lower=0.05, upper=20.0)
assert w.shape == (2, 3)
r = K.value_lstsq(torch.rand(2, 6, 3), torch.rand(2, 6, 4))
assert r.solution.shape == (2, 3, 4)
print("ok")
"""


def test_package_imports_and_runs_without_triton():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "ok"


def test_cpu_tensors_use_torch_unless_forced(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(TRITON_ENV, raising=False)
    assert not use_triton(cpu, None)
    monkeypatch.setenv(TRITON_ENV, "0")
    assert not use_triton(cpu)
    monkeypatch.setenv(TRITON_ENV, "1")
    assert use_triton(cpu) == triton_available()


@pytest.mark.triton_kernel
def test_cuda_tensors_use_triton(triton_device, monkeypatch):
    monkeypatch.delenv(TRITON_ENV, raising=False)
    assert use_triton(torch.zeros(1, device=triton_device)) == (triton_device.type == "cuda")
    monkeypatch.setenv(TRITON_ENV, "0")
    assert not use_triton(torch.zeros(1, device=triton_device))
