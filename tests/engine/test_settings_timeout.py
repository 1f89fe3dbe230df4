"""--kv-compaction raises vLLM's execute_model RPC timeout (a long compaction must not declare the engine dead)."""

from __future__ import annotations

import os

import pytest

from vllm_compact.config import CompactionConfig
from vllm_compact.integration import settings


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.setattr("vllm_compact.integration.install.install", lambda config: None)
    for name in (settings.EXECUTE_MODEL_TIMEOUT_ENV, "VLLM_USE_V2_MODEL_RUNNER", "VLLM_COMPACT_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_activate_raises_the_execute_model_timeout(clean_env) -> None:
    settings.activate(CompactionConfig(enabled=True))
    import vllm.envs as envs

    assert int(os.environ[settings.EXECUTE_MODEL_TIMEOUT_ENV]) == settings.EXECUTE_MODEL_TIMEOUT_S
    assert envs.VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS == settings.EXECUTE_MODEL_TIMEOUT_S > 300


def test_a_users_timeout_wins(clean_env) -> None:
    clean_env.setenv(settings.EXECUTE_MODEL_TIMEOUT_ENV, "123")
    settings.activate(CompactionConfig(enabled=True))
    assert os.environ[settings.EXECUTE_MODEL_TIMEOUT_ENV] == "123"
