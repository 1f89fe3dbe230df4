"""Runs every `triton_kernel` test of this folder under TRITON_INTERPRET=1 in a fresh pytest process on CPU.

triton reads TRITON_INTERPRET when it is imported, so the interpreter cannot be switched on inside a pytest
process that may already have imported triton (and must not be switched on for the other tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TRITON_MARK = "triton_kernel"  # registered in this folder's conftest.py
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", TRITON_MARK, str(Path(__file__).parent)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    assert proc.returncode == 0, f"interpreter-mode Triton tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert summary and " passed" in summary[0] and "skipped" not in summary[0], proc.stdout[-4000:]
