"""`--kv-compaction` refuses every platform but vLLM's CPU engine, before anything is installed or loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from vllm_compact.config import ENV_VAR, CompactionConfig

CONFIG = CompactionConfig(enabled=True)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)


def test_cuda_is_refused_and_nothing_is_exported(monkeypatch, clean_env):
    import torch

    from vllm_compact.integration import settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CPU engine only.*Run without --kv-compaction on GPU"):
        settings.engine_kwargs(CONFIG)
    assert ENV_VAR not in os.environ and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ


def test_another_non_cpu_vllm_platform_is_refused(monkeypatch, clean_env):
    import vllm.platforms

    from vllm_compact.integration import settings

    monkeypatch.setattr(vllm.platforms, "_current_platform", SimpleNamespace(is_cpu=lambda: False, device_name="xpu"))
    with pytest.raises(RuntimeError, match="CPU engine only; this vLLM runs on 'xpu'"):
        settings.activate(CONFIG)
    assert ENV_VAR not in os.environ


def test_cpu_is_accepted_and_installs_the_admission_hook_next_to_the_callers_processors(clean_env):
    from vllm_compact.integration import settings

    kwargs = settings.engine_kwargs(CONFIG, logits_processors=["my.mod:Proc"], dtype="float32")
    assert kwargs["logits_processors"] == ["my.mod:Proc", settings.VALIDATOR_CLS]
    assert kwargs["dtype"] == "float32" and kwargs["scheduler_cls"] == settings.SCHEDULER_CLS
    args = SimpleNamespace(logits_processors=None)
    settings.apply_to_serve_args(args, CONFIG)
    assert args.logits_processors == [settings.VALIDATOR_CLS]
    assert json.loads(os.environ[ENV_VAR])["enabled"] is True


_SERVE_ON_CUDA = """
import contextlib, io, json, sys
import torch
torch.cuda.is_available = lambda: True  # what a CUDA machine answers
from vllm_compact.server.serve import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "stderr": err.getvalue()}))
"""


def test_serve_on_cuda_exits_2_before_the_model_loads():
    # A model that does not exist: had the refusal not come first, vLLM would fail on it with a traceback instead.
    argv = ["/no/such/model", "--kv-compaction", "--max-model-len", "2048", "--dtype", "float32"]
    proc = subprocess.run([sys.executable, "-c", _SERVE_ON_CUDA, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rc"] == 2
    last = out["stderr"].strip().splitlines()[-1]  # vLLM and the memory default log lines before it
    assert last.startswith("vllm-compact serve: vllm-compact 0.1 runs compaction inside the CPU engine only")
    assert "Traceback" not in out["stderr"]
