"""Where the Triton kernel tests run.

Tests marked `triton_kernel` launch Triton kernels. They run in this process on a GPU (compiled Triton), or on
CPU when TRITON_INTERPRET=1 was set before triton was imported (triton reads it at import time). Otherwise they
are deselected here, and test_kernels_triton_interpreter.py runs them all in a fresh interpreter-mode pytest
subprocess, so they run in every CI without setting TRITON_INTERPRET for anyone else's tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

TRITON_MARK = "triton_kernel"
HERE = Path(__file__).resolve().parent


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_runs_in_process() -> bool:
    return interpreter_requested() or torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{TRITON_MARK}: launches a Triton kernel (GPU, or CPU interpreter)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if triton_runs_in_process():
        return
    mine = [item for item in items if item.get_closest_marker(TRITON_MARK) and HERE in Path(item.path).parents]
    if mine:
        config.hook.pytest_deselected(items=mine)
        items[:] = [item for item in items if item not in mine]


@pytest.fixture
def triton_device() -> torch.device:
    """CPU under the interpreter when it was requested, else the GPU (compiled Triton)."""
    pytest.importorskip("triton")
    return torch.device("cpu") if interpreter_requested() else torch.device("cuda")
