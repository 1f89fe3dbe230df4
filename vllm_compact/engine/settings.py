"""How compaction is switched on in vLLM: engine arguments and the environment every vLLM process inherits."""

from __future__ import annotations

import argparse
import logging
import os

from vllm_compact.config import ENV_VAR, CompactionConfig

logger = logging.getLogger("vllm_compact")

SCHEDULER_CLS = "vllm_compact.engine.scheduler.CompactionScheduler"
WORKER_CLS = "vllm_compact.engine.worker.CompactionCPUWorker"


def _check_platform() -> None:
    import torch

    if torch.cuda.is_available():
        raise RuntimeError(
            "vllm-compact 0.1 runs compaction inside the CPU engine only; the GPU engine integration "
            "(Triton compact-segment kernel + FlashAttention LSE merge) is not wired into vLLM yet. "
            "Run without --kv-compaction on GPU."
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
    from vllm_compact.engine.install import install

    install(config)  # this process too (plugins may already have been loaded before the env was set)
    logger.info("vllm-compact: prefix caching is disabled while KV compaction is enabled (compact pages are private)")
    return {
        "scheduler_cls": SCHEDULER_CLS,
        "worker_cls": WORKER_CLS,
        "enable_prefix_caching": False,
        "async_scheduling": False,
    }


def engine_kwargs(config: CompactionConfig, **kwargs) -> dict:
    """kwargs for `vllm.LLM(...)` / `EngineArgs(...)` with compaction on: `LLM(model, **engine_kwargs(cfg))`."""
    return {**kwargs, **activate(config)}


def apply_to_serve_args(args: argparse.Namespace, config: CompactionConfig) -> None:
    for name, value in activate(config).items():
        setattr(args, name, value)
