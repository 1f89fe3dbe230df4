"""The offline engine as the benchmarks drive it: an in-process `vllm.LLM`, stepped by hand, with what they report.

The benchmarks import vLLM only through this module, so a vLLM upgrade moves only the integration.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

from vllm_compact.config import CompactionConfig
from vllm_compact.core.state import worker_state
from vllm_compact.integration.settings import engine_kwargs as compaction_kwargs
from vllm_compact.vllm_compat import patch_vllm_version


@dataclass
class EngineRunStats:
    wall_seconds: float = 0.0
    steps: int = 0
    peak_running: int = 0
    preemptions: int = 0
    peak_logical_tokens: int = 0   # sum over running requests, at the step where it peaked
    physical_at_peak_logical: int = 0
    peak_physical_tokens: int = 0
    free_blocks_initial: int = 0
    free_blocks_final: int = 0
    compaction: dict = field(default_factory=dict)


def make_engine(model: str, compaction: dict | None, **engine_kwargs):
    """An in-process LLM with compaction configured from a dict of CompactionConfig fields (None = stock)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A fixed KV budget (GiB) instead of vLLM's CPU default of reserving 92% of the machine's memory.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    patch_vllm_version()
    from vllm import LLM

    if compaction is not None:
        from vllm_compact.core.support import model_refusals, raise_refusals
        from vllm_compact.head_table import read_model_config

        # A model compaction does not support is refused before it loads (the scheduler would refuse it after).
        raise_refusals(model_refusals(read_model_config(model), bool(engine_kwargs.get("disable_sliding_window"))))
        engine_kwargs = compaction_kwargs(CompactionConfig(enabled=True, **compaction), **engine_kwargs)
    return LLM(model=model, **engine_kwargs)


def run_requests(llm, prompts: list[dict], params: list, on_step=None) -> tuple[dict, EngineRunStats]:
    """prompts: [{"id", "prompt_token_ids"}]; returns ({id: RequestOutput}, stats). `on_step()` is called after
    every engine step (the worker state is in this process: the engine runs without multiprocessing)."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    stats = EngineRunStats(free_blocks_initial=pool.get_num_free_blocks())
    physical = getattr(scheduler, "physical_tokens", lambda r: r.num_computed_tokens)
    for prompt, p in zip(prompts, params):
        engine.add_request(prompt["id"], {"prompt_token_ids": prompt["prompt_token_ids"]}, p)
    outputs = {}
    preempt: dict[str, int] = {}
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        if on_step is not None:
            on_step()
        stats.steps += 1
        running = list(scheduler.running)
        stats.peak_running = max(stats.peak_running, len(running))
        logical = sum(r.num_computed_tokens for r in running)
        phys = sum(physical(r) for r in running)
        stats.peak_physical_tokens = max(stats.peak_physical_tokens, phys)
        if logical > stats.peak_logical_tokens:
            stats.peak_logical_tokens, stats.physical_at_peak_logical = logical, phys
        for req in scheduler.requests.values():
            preempt[req.request_id] = max(preempt.get(req.request_id, 0), req.num_preemptions)
    stats.wall_seconds = time.perf_counter() - started
    stats.preemptions = sum(preempt.values())
    stats.free_blocks_final = pool.get_num_free_blocks()
    if hasattr(scheduler, "compaction_stats"):
        ws = worker_state()
        stats.compaction = {**scheduler.compaction_stats.as_dict(), **(ws.stats.as_dict() if ws else {})}
    return outputs, stats


def stats_dict(stats: EngineRunStats) -> dict:
    return asdict(stats)


def sampling_params(**kwargs):
    """vllm.SamplingParams(**kwargs)."""
    patch_vllm_version()
    from vllm import SamplingParams

    return SamplingParams(**kwargs)


def token_prompt(token_ids: list[int]):
    """A prompt given as token ids (vllm.inputs.TokensPrompt)."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=token_ids)


def stock_engine(model: str, **kwargs):
    """vllm.LLM(model, **kwargs) without compaction (the plugin stays inert unless compaction is configured)."""
    patch_vllm_version()
    from vllm import LLM

    return LLM(model=model, **kwargs)
