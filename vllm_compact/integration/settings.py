"""How compaction is switched on in vLLM: engine arguments and the environment every vLLM process inherits."""

from __future__ import annotations

import argparse
import logging
import os

from vllm_compact.config import ENV_VAR, CompactionConfig

logger = logging.getLogger("vllm_compact")

SCHEDULER_CLS = "vllm_compact.integration.scheduler.CompactionScheduler"
WORKER_CLS = "vllm_compact.integration.worker.CompactionCPUWorker"
# vLLM's per-request admission hook (a logits processor's validate_params): bad kv_compaction_* keys are refused
# in the front-end process, for the offline LLM API and every HTTP route alike.
VALIDATOR_CLS = "vllm_compact.integration.request_validation:CompactionRequestValidator"  # vLLM wants <module>:<type>
# A step's compactions run inside the worker's execute_model: on a small CPU a large one (am-omp at 5x over 4K
# tokens) takes minutes, and vLLM's default 300 s RPC timeout then declares the whole engine dead.
EXECUTE_MODEL_TIMEOUT_ENV = "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"
EXECUTE_MODEL_TIMEOUT_S = 3600


def _check_platform() -> None:
    """Compaction runs inside vLLM's CPU engine only: refuse any other platform before anything is installed."""
    import torch

    if torch.cuda.is_available():
        raise RuntimeError(
            "vllm-compact 0.1 runs compaction inside the CPU engine only; the GPU engine integration "
            "(Triton compact-segment kernel + FlashAttention LSE merge) is not wired into vLLM yet. "
            "Run without --kv-compaction on GPU."
        )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise RuntimeError(
            f"vllm-compact 0.1 runs compaction inside vLLM's CPU engine only; this vLLM runs on "
            f"{current_platform.device_name!r}. Run without --kv-compaction here."
        )


def activate(config: CompactionConfig) -> dict:
    """Export the config to every vLLM process and return the engine kwargs that install our classes."""
    _check_platform()
    os.environ[ENV_VAR] = config.to_env()
    # Our model runner extends vLLM's V1 CPU runner: with V2 the scheduler would plan compactions that no worker
    # code executes, so the pin is not a default the environment may override.
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("", "0"):
        raise RuntimeError("--kv-compaction needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    os.environ.setdefault(EXECUTE_MODEL_TIMEOUT_ENV, str(EXECUTE_MODEL_TIMEOUT_S))  # a user's setting wins
    from vllm_compact.integration.install import install

    install(config)  # this process too (plugins may already have been loaded before the env was set)
    # Prefix caching stays as the user set it (vLLM's default: on): integration/prefix_cache.py keeps blocks written
    # under a compaction history out of the cache.
    return {
        "scheduler_cls": SCHEDULER_CLS,
        "worker_cls": WORKER_CLS,
        "async_scheduling": False,
        "logits_processors": [VALIDATOR_CLS],
    }


def _with_validator(ours: dict, theirs: list | None) -> dict:
    """The caller's own logits processors stay, ours is added once."""
    given = list(theirs or [])
    return {**ours, "logits_processors": given + [p for p in ours["logits_processors"] if p not in given]}


def check_engine_kwargs(config: CompactionConfig, kwargs: dict) -> None:
    """Refuse (UnsupportedSetting, a ValueError) what compaction does not support among `vllm.LLM` kwargs, before
    any model loads; the engine's scheduler checks again on the configuration vLLM resolves."""
    if not config.enabled:
        return
    from vllm_compact.core.support import PARALLEL_SETTINGS, kv_cache_dtype_refusals, parallel_refusals, raise_refusals

    reasons = parallel_refusals(**{name: kwargs.get(name) for _, name, _ in PARALLEL_SETTINGS})
    raise_refusals(reasons + kv_cache_dtype_refusals(kwargs.get("kv_cache_dtype")))


def engine_kwargs(config: CompactionConfig, **kwargs) -> dict:
    """kwargs for `vllm.LLM(...)` / `EngineArgs(...)` with compaction on: `LLM(model, **engine_kwargs(cfg))`."""
    check_engine_kwargs(config, kwargs)
    return {**kwargs, **_with_validator(activate(config), kwargs.get("logits_processors"))}


def apply_to_serve_args(args: argparse.Namespace, config: CompactionConfig) -> None:
    ours = _with_validator(activate(config), getattr(args, "logits_processors", None))
    for name, value in ours.items():
        setattr(args, name, value)
