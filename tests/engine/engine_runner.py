"""Runs one vLLM engine scenario in its own process and saves what the tests compare (torch.save).

Usage: python engine_runner.py SCENARIO.json OUT.pt
The scenario JSON: {"model": path, "compaction": {...} | null, "engine": {...LLM kwargs}, "engine_override": {...LLM
kwargs applied after compaction's}, "requests": [{"id",
"prompt_token_ids", "max_tokens", "logprobs", "prompt_logprobs", "abort_after_steps"}], "max_steps": int,
"capture_plans": bool (PlanCapture: each plan's inputs and the step reports, saved as "plans" and "reports"),
"pressure_at": {id: [tokens computed]} (force_pressure_at)}
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm_compact.vllm_compat import patch_vllm_version  # noqa: E402

patch_vllm_version()


def fetch_segments(worker, req_ids):
    """Runs in the worker: the compact entries of each request, per layer, per KV head."""
    from vllm_compact.core.compactor import read_segment_head
    from vllm_compact.core.compact_pages import page_view
    from vllm_compact.core.state import worker_state

    state = worker_state()
    out = {}
    for req_id in req_ids:
        seg = state.segment(req_id)
        if seg is None:
            continue
        layers, positions = [], []
        for layer, cache in enumerate(state.layer_caches):
            pages = page_view(cache)
            heads = [read_segment_head(seg, pages, layer, h) for h in range(seg.head_len.shape[1])]
            layers.append([(k.clone(), v.clone(), beta.clone()) for k, v, beta, _ in heads])
            positions.append([pos.clone() for *_, pos in heads])
        out[req_id] = {"start_block": seg.start_block, "end_block": seg.end_block, "layers": layers,
                       "positions": positions}
    return out


class PlanCapture:
    """Wraps the worker's SegmentCompactor.execute (same process: VLLM_ENABLE_V1_MULTIPROCESSING=0) to record, for
    every plan a step sends, what the compactor will read: its source pages' keys and values per layer and the
    request's reference queries, taken BEFORE the step runs any plan (so they are the request's own KV whatever the
    step then does to the pages), and which plans the step's report lists as written."""

    def __init__(self) -> None:
        self.step = 0  # the runner's step counter, set before each engine step
        self.plans: list[dict] = []
        self.reports: list[dict] = []

    def install(self) -> None:
        from vllm_compact.core.compactor import SegmentCompactor

        execute, capture = SegmentCompactor.execute, self

        def recording_execute(compactor, step, layers_per_step=0):
            for plan in step.plans:
                capture.plans.append(capture._inputs(compactor, plan))
            report = execute(compactor, step, layers_per_step)
            capture.reports.append({"step": capture.step, "written": list(report.written),
                                    "failed": list(report.failed), "pending": list(report.pending)})
            return report

        SegmentCompactor.execute = recording_execute

    def _inputs(self, compactor, plan) -> dict:
        import torch

        state = compactor.state
        reservoir = state.reservoir_of(plan.req_id)
        source = torch.tensor(plan.source_block_ids, dtype=torch.int64)
        layers = []
        for layer, cache in enumerate(state.layer_caches):
            keys, values = compactor.layout.read(cache, source)
            queries = reservoir.queries(layer).clone() if reservoir is not None and reservoir.size > 0 else None
            layers.append({"keys": keys.clone(), "values": values.clone(), "queries": queries})
        return {"step": self.step, "req_id": plan.req_id, "method": plan.method,
                "sources_released": plan.sources_released, "start_block": plan.start_block,
                "prev_end_block": plan.prev_end_block, "end_block": plan.end_block,
                "source_block_ids": list(plan.source_block_ids), "dest_block_ids": list(plan.dest_block_ids),
                "head_budgets": [list(row) for row in plan.head_budgets], "layers": layers}


def force_pressure_at(scheduler, points: dict[str, list[int]]) -> None:
    """Memory pressure whenever a running request has computed exactly one of its listed token counts (besides
    real pressure): a roomy engine then compacts a request alone at the points another run compacted it under
    real pressure."""
    real = scheduler.planner.under_pressure

    def under_pressure(*args) -> bool:
        forced = any(r.num_computed_tokens in counts for r in scheduler.running for rid, counts in points.items()
                     if r.request_id == rid or r.request_id.startswith(rid + "-"))
        return forced or real(*args)

    scheduler.planner.under_pressure = under_pressure


def worker_stats(worker):
    from vllm_compact.core.state import worker_state

    state = worker_state()
    if state is None:
        return None
    return {**state.stats.as_dict(), "records": len(state.requests),
            "segments": sum(r.segment is not None for r in state.requests.values()),
            "reservoirs": sum(r.reservoir is not None for r in state.requests.values()),
            "outside_pool_bytes": state.outside_pool_bytes}


def main() -> None:
    import torch
    from vllm import LLM, SamplingParams

    scenario = json.load(open(sys.argv[1]))
    engine_kwargs = {"dtype": "float32", "enforce_eager": True, "seed": 0, **scenario.get("engine", {})}
    if scenario.get("compaction") is not None:
        from vllm_compact.config import CompactionConfig
        from vllm_compact.integration.settings import engine_kwargs as compaction_kwargs

        # Compaction by length whatever the pool's free share, unless a scenario says otherwise.
        settings = {"pool_watermark": 1.0, **scenario["compaction"]}
        engine_kwargs = compaction_kwargs(CompactionConfig(enabled=True, **settings), **engine_kwargs)
    engine_kwargs.update(scenario.get("engine_override", {}))  # e.g. a worker class that is not ours
    capture = PlanCapture() if scenario.get("capture_plans") else None
    if capture is not None:
        capture.install()
    llm = LLM(model=scenario["model"], **engine_kwargs)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    if scenario.get("pressure_at"):
        force_pressure_at(scheduler, scenario["pressure_at"])
    pool = scheduler.kv_cache_manager.block_pool
    free_initial = pool.get_num_free_blocks()

    requests = {r["id"]: r for r in scenario["requests"]}

    def add(r):
        params = SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], logprobs=r.get("logprobs"),
                                prompt_logprobs=r.get("prompt_logprobs"), ignore_eos=True,
                                extra_args=r.get("extra_args"))
        engine.add_request(r["id"], {"prompt_token_ids": r["prompt_token_ids"]}, params)

    results = {rid: {"events": [], "output": None} for rid in requests}
    # A request with "after": it is added once that request has finished (a later turn or a later user).
    pending = [r for r in scenario["requests"] if r.get("after")]
    for r in scenario["requests"]:
        if not r.get("after"):
            add(r)
    first_compaction: dict[str, int] = {}  # internal id -> tokens computed before its first compaction step
    awaiting: dict[str, tuple[str, int, int]] = {}  # internal id -> (id, step planned, tokens computed before)
    seen_end: dict[str, int] = {}  # internal id -> end block of the last segment recorded
    prefix_violations: list[str] = []

    def check_prefix_cache():
        """No block written after a request's first compaction, and no compact page, is a prefix-cache block."""
        planner = getattr(scheduler, "planner", None)
        if planner is None:
            return
        for iid, span in planner.spans.items():
            for page in span.page_ids:
                if pool.blocks[page].block_hash is not None:
                    prefix_violations.append(f"{iid}: compact page {page} is cached")
            blocks = scheduler._req_blocks(iid)
            for index in range(first_compaction.get(iid, 0) // scheduler.block_size, len(blocks)):
                block = blocks[index]
                if not block.is_null and block.block_hash is not None:
                    prefix_violations.append(f"{iid}: block {index} written after compaction is cached")

    def internal_id(external: str) -> str | None:
        return next((k for k in scheduler.requests if k == external or k.startswith(external + "-")), None)

    peak_running = 0
    peak_used_blocks = 0
    preemptions: dict[str, int] = {}
    max_physical: dict[str, int] = {}
    max_logical: dict[str, int] = {}
    step = 0
    while (engine.has_unfinished_requests() or pending) and step < scenario.get("max_steps", 10_000):
        computed_before = {}
        compactions_before = {}
        for rid in requests:
            iid = internal_id(rid)
            if iid is not None:
                computed_before[rid] = scheduler.requests[iid].num_computed_tokens
                compactions_before[rid] = scheduler.compactions(scheduler.requests[iid]) if hasattr(
                    scheduler, "compactions") else 0
        if capture is not None:
            capture.step = step + 1
        outputs = engine.step()
        step += 1
        peak_running = max(peak_running, len(scheduler.running))
        peak_used_blocks = max(peak_used_blocks, free_initial - pool.get_num_free_blocks())
        for rid in requests:
            iid = internal_id(rid)
            if iid is None:
                continue
            req = scheduler.requests[iid]
            preemptions[rid] = max(preemptions.get(rid, 0), req.num_preemptions)
            physical = scheduler.physical_tokens(req) if hasattr(scheduler, "physical_tokens") else req.num_computed_tokens
            max_physical[rid] = max(max_physical.get(rid, 0), physical)
            max_logical[rid] = max(max_logical.get(rid, 0), req.num_computed_tokens)
        changed = {}
        for rid in requests:
            iid = internal_id(rid)
            count = scheduler.compactions(scheduler.requests[iid]) if iid and hasattr(scheduler, "compactions") else 0
            if count and count != compactions_before.get(rid, 0):
                changed[iid] = rid
        for iid, rid in changed.items():
            first_compaction.setdefault(iid, computed_before[rid])
            awaiting[iid] = (rid, step, computed_before[rid])
        check_prefix_cache()
        if awaiting:
            # A plan's segment is installed once the worker has written every layer (possibly steps later); a plan
            # undone meanwhile never shows one (its request plans again).
            segs = llm.collective_rpc(fetch_segments, args=(list(awaiting),))[0]
            for iid in [i for i in awaiting if i in segs and segs[i]["end_block"] != seen_end.get(i)]:
                rid, planned_step, before = awaiting.pop(iid)
                seen_end[iid] = segs[iid]["end_block"]
                results[rid]["events"].append({"step": planned_step, "installed_step": step,
                                               "computed_before": before, **segs[iid]})
        for out in outputs:
            if out.finished:
                results[out.request_id]["output"] = out
        for r in [r for r in pending if results[r["after"]]["output"] is not None]:
            pending.remove(r)
            add(r)
        for rid, r in requests.items():
            if r.get("abort_after_steps") == step:
                engine.abort_request([rid])

    if scenario.get("flush_step"):
        # vLLM tells the worker which requests finished in the NEXT step's scheduler output; with nothing left to
        # run there is no next step. One tiny request gives the worker that step, so its state can be inspected.
        engine.add_request("flush", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(temperature=0.0, max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()

    final = {}
    for rid, res in results.items():
        out = res["output"]
        if out is None:
            final[rid] = {"events": res["events"], "aborted": True}
            continue
        comp = out.outputs[0]
        final[rid] = {
            "events": res["events"],
            "prompt_token_ids": list(out.prompt_token_ids),
            "num_cached_tokens": out.num_cached_tokens,
            "token_ids": list(comp.token_ids),
            "logprobs": [{t: lp.logprob for t, lp in d.items()} for d in (comp.logprobs or [])],
            "prompt_logprobs": [None if d is None else {t: lp.logprob for t, lp in d.items()}
                                for d in (out.prompt_logprobs or [])],
        }
    stats = {
        "free_initial": free_initial,
        "free_final": pool.get_num_free_blocks(),
        "num_blocks": pool.num_gpu_blocks,
        "peak_running": peak_running,
        "peak_used_blocks": peak_used_blocks,
        "preemptions": preemptions,
        "max_physical": max_physical,
        "max_logical": max_logical,
        "steps": step,
        "scheduler": getattr(scheduler, "compaction_stats", None) and scheduler.compaction_stats.as_dict(),
        "worker": llm.collective_rpc(worker_stats)[0],
        "block_size": scheduler.block_size,
        "prefix_violations": prefix_violations,
        "first_compaction": first_compaction,
    }
    saved = {"requests": final, "stats": stats}
    if capture is not None:
        saved["plans"], saved["reports"] = capture.plans, capture.reports
    torch.save(saved, sys.argv[2])


if __name__ == "__main__":
    main()
