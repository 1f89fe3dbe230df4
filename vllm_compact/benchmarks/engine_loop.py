"""Drive an in-process vLLM engine step by step and record what the benchmarks report.

Run one engine per process (`run_isolated`): compaction settings live in the process environment and vLLM keeps
global state, so every configuration gets a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


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
    from vllm_compact.vllm_compat import patch_vllm_version

    patch_vllm_version()
    from vllm import LLM

    if compaction is not None:
        from vllm_compact.config import CompactionConfig
        from vllm_compact.integration.settings import engine_kwargs as compaction_kwargs

        engine_kwargs = compaction_kwargs(CompactionConfig(enabled=True, **compaction), **engine_kwargs)
    return LLM(model=model, **engine_kwargs)


def run_requests(llm, prompts: list[dict], params: list) -> tuple[dict, EngineRunStats]:
    """prompts: [{"id", "prompt_token_ids"}]; returns ({id: RequestOutput}, stats)."""
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
        from vllm_compact.core.state import worker_state

        ws = worker_state()
        stats.compaction = {**scheduler.compaction_stats.as_dict(), **(ws.stats.as_dict() if ws else {})}
    return outputs, stats


def run_isolated(module: str, job: dict, timeout: float | None = None) -> dict:
    """Run `python -m module --job JSON --out FILE` in a fresh process and return the JSON it wrote."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-compact-job-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", module, "--job", json.dumps(job), "--out", str(out)]
    proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} job failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def stats_dict(stats: EngineRunStats) -> dict:
    return asdict(stats)
