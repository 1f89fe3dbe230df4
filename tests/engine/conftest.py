"""Engine scenarios run in their own process (vLLM keeps global state); results are cached per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUNNER = Path(__file__).with_name("engine_runner.py")


def run_scenario(scenario: dict, tmp_path: Path, timeout: int = 1800, env: dict | None = None) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "scenario.json"
    out = tmp_path / "result.pt"
    spec.write_text(json.dumps(scenario))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           **(env or {})}
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec), str(out)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"engine scenario failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from vllm_compact.models.registry import ensure_model

    return str(ensure_model("tiny"))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from vllm_compact.models.registry import ensure_model

    return str(ensure_model("smollm2-135m"))
