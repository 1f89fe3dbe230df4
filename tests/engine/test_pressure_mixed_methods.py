"""KV contents of compact segments made under memory pressure, several methods in one step.

Under pressure a plan's source pages go back to the pool at planning, so a later plan of the same step may get them
as its destination pages. Four requests compact in one such step, each with its own method: SnapKV and
am-highest-attention (per-request `kv_compaction_method`, with reference queries), `recent`, and the default AM
method on a request too short to capture reference queries (the fallback to `recent`). The run is checked against:

- the request's own KV: every plan's inputs are captured before its step runs any plan (engine_runner.PlanCapture:
  source pages and reference queries), and checked against the HF model's KV of the request's tokens;
- an independent reference of each method on those inputs, per layer and KV head, in float64 plain torch (the
  newest keys; SnapKV's max-pooled RMS attention scores), and for AM the library's solver run in float64 on that
  request alone: the segment read back from the pool pages (keys, values, beta, positions) must be what the method
  makes of the request's own KV;
- answers: each request's greedy tokens equal those of the same request run alone in a roomy pool, compacted at the
  same points (forced there: engine_runner.force_pressure_at).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.engine.conftest import run_scenario
from vllm_compact.am import HeadBatch, compact_heads
from vllm_compact.config import CompactionConfig

BLOCK = 32
SNAPKV_POOL = 7  # SnapKV's default max-pooling kernel

COMPACTION = {
    "trigger_tokens": 256,  # only requests whose prompt + max tokens pass it capture reference queries
    "recent_window_tokens": 32,
    "protected_initial_tokens": 1,
    "ratio": 1.5,  # large destinations: a later plan's pages reach into an earlier plan's freed sources
    "pool_watermark": 0.0,  # compaction only under memory pressure
    "memory_pressure": True,
    "distinct_share": 0.0,
}
# (id, max_tokens, kv_compaction_method or None for the server's, effective method of the first compaction). All
# prompts are 200 tokens: the plans of the pressure step free the same number of pages, so they run in this order.
REQUESTS = (
    ("fallback", 12, None, "recent"),  # prompt + max tokens below the trigger: no reference queries
    ("snapkv", 200, "snapkv", "snapkv"),
    ("am", 200, None, "am-highest-attention"),
    ("recent", 200, "recent", "recent"),
)
FIRST_METHOD = {rid: method for rid, _, _, method in REQUESTS}


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4000) for _ in range(n)]


def _requests() -> list[dict]:
    return [{"id": rid, "prompt_token_ids": _prompt(200, i), "max_tokens": max_tokens,
             **({"extra_args": {"kv_compaction_method": method}} if method else {})}
            for i, (rid, max_tokens, method, _) in enumerate(REQUESTS)]


def _external(req_id: str) -> str:
    return next(rid for rid, *_ in REQUESTS if req_id == rid or req_id.startswith(rid + "-"))


@pytest.fixture(scope="module")
def pressure_run(tiny_model_path, tmp_path_factory):
    """36 pages of 32 tokens for four prompts of 200 tokens: the pool runs short as the last prompt is prefilled."""
    return run_scenario({
        "model": tiny_model_path, "compaction": COMPACTION, "capture_plans": True,
        "engine": {"block_size": BLOCK, "max_num_batched_tokens": 128, "max_model_len": 512,
                   "num_gpu_blocks_override": 36},
        "requests": _requests(),
    }, tmp_path_factory.mktemp("pressure"))


@pytest.fixture(scope="module")
def alone_run(pressure_run, tiny_model_path, tmp_path_factory):
    """The same requests one after the other in a roomy pool, each compacted where the pressure run compacted it."""
    requests = _requests()
    for before, request in zip(requests, requests[1:]):
        request["after"] = before["id"]
    points = {rid: [e["computed_before"] for e in record["events"]]
              for rid, record in pressure_run["requests"].items()}
    return run_scenario({
        "model": tiny_model_path, "compaction": COMPACTION, "capture_plans": True, "pressure_at": points,
        "engine": {"block_size": BLOCK, "max_num_batched_tokens": 128, "max_model_len": 512},
        "requests": requests,
    }, tmp_path_factory.mktemp("alone"))


@pytest.fixture(scope="module")
def model_kv(pressure_run, tiny_model_path):
    """rid -> per layer (keys, values) [Hkv, T, D] float64 of the request's whole token sequence, from the HF model
    (valid in every layer up to its first compaction, in layer 0 at every position)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, torch_dtype=torch.float64).eval()
    out = {}
    for rid, record in pressure_run["requests"].items():
        tokens = torch.tensor([record["prompt_token_ids"] + record["token_ids"]])
        with torch.no_grad():
            cache = model(tokens, use_cache=True).past_key_values
        out[rid] = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    return out


def _plans(run: dict) -> list[dict]:
    return [{**plan, "rid": _external(plan["req_id"])} for plan in run["plans"]]


def _segment(run: dict, plan: dict) -> dict:
    """The segment the plan installed, as read back from the pool pages."""
    events = [e for e in run["requests"][plan["rid"]]["events"] if e["step"] == plan["step"]]
    assert len(events) == 1, f"{plan['rid']}: the plan of step {plan['step']} installed no segment"
    return events[0]


def _previous_segment(run: dict, plan: dict) -> dict | None:
    earlier = [e for e in run["requests"][plan["rid"]]["events"] if e["step"] < plan["step"]]
    return earlier[-1] if earlier else None


def _pressure_step(run: dict) -> list[dict]:
    """The plans of the step that compacts all four requests."""
    plans = [p for p in _plans(run) if p["prev_end_block"] == p["start_block"]]
    steps = {p["step"] for p in plans}
    assert len(steps) == 1, f"the first compactions must share one step, got steps {sorted(steps)}"
    return plans


# ---- the scenario does what the test needs ----------------------------------------------------------------------


def test_one_pressure_step_mixes_methods_and_reuses_freed_sources_as_destinations(pressure_run):
    plans = _pressure_step(pressure_run)
    assert sorted(p["rid"] for p in plans) == sorted(FIRST_METHOD)
    assert all(p["sources_released"] for p in plans), "every plan must be made under memory pressure"
    queries = {p["rid"]: p["layers"][0]["queries"] for p in plans}
    assert queries["fallback"] is None, "the fallback request must have no reference queries"
    assert queries["snapkv"] is not None and queries["am"] is not None
    assert {p["method"] for p in plans} == {"am-highest-attention", "snapkv", "recent"}
    # A freed source page of one plan is a destination page of a plan with another method, in the same step.
    reused = [(writer["rid"], reader["rid"]) for writer in plans for reader in plans
              if FIRST_METHOD[writer["rid"]] != FIRST_METHOD[reader["rid"]]
              and set(writer["dest_block_ids"]) & set(reader["source_block_ids"])]
    assert reused, "no plan's destination reused another method's source pages: the test would prove nothing"
    stats = pressure_run["stats"]
    assert stats["scheduler"]["lost_plans"] == 0 and stats["worker"]["failures"] == 0
    assert sum(stats["preemptions"].values()) == 0
    for report in pressure_run["reports"]:
        assert not report["failed"] and not report["pending"]


def test_captured_inputs_are_the_requests_own_kv(pressure_run, model_kv):
    """The captured source pages hold the HF model's KV of the request's tokens at the span's positions: in every
    layer before a request's first compaction, in layer 0 (token and position only) for re-compactions."""
    checked = 0
    for plan in _plans(pressure_run):
        first = plan["prev_end_block"] == plan["start_block"]
        span = slice(plan["prev_end_block"] * BLOCK, plan["end_block"] * BLOCK)
        for layer, captured in enumerate(plan["layers"] if first else plan["layers"][:1]):
            keys, values = model_kv[plan["rid"]][layer]
            assert torch.allclose(captured["keys"].double(), keys[:, span], atol=1e-4), (plan["rid"], layer)
            assert torch.allclose(captured["values"].double(), values[:, span], atol=1e-4), (plan["rid"], layer)
            checked += 1
    assert checked >= 16


# ---- the segments hold what each method makes of the request's own KV -------------------------------------------


def _head_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[n, Hq, D] -> [Hkv, n * group, D]: query head j reads KV head j // group (token-major rows)."""
    n, num_heads, dim = queries.shape
    group = num_heads // num_kv_heads
    return queries.view(n, num_kv_heads, group, dim).transpose(0, 1).reshape(num_kv_heads, n * group, dim)


def _span_entries(run: dict, plan: dict, layer: int, head: int):
    """(keys, values, beta, positions) of every key the plan compacts: the old segment's entries, then its
    source tokens."""
    captured = plan["layers"][layer]
    keys, values = captured["keys"][head], captured["values"][head]
    positions = torch.arange(plan["prev_end_block"] * BLOCK, plan["end_block"] * BLOCK)
    beta = torch.zeros(keys.shape[0])
    old = _previous_segment(run, plan)
    if plan["prev_end_block"] > plan["start_block"]:
        assert old is not None and old["end_block"] == plan["prev_end_block"]
        old_keys, old_values, old_beta = old["layers"][layer][head]
        keys, values = torch.cat([old_keys, keys]), torch.cat([old_values, values])
        beta, positions = torch.cat([old_beta, beta]), torch.cat([old["positions"][layer][head], positions])
    return keys, values, beta, positions


def _rms_scores(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    weights = torch.softmax(scale * queries.double() @ keys.double().T, dim=1)  # [N, T]
    return weights.square().mean(dim=0).sqrt()


def _assert_top_set(scores: torch.Tensor, kept: torch.Tensor, budget: int, what: str) -> None:
    """`kept` (indices) is a set of `budget` best scores: ties at the boundary may go either way."""
    assert kept.numel() == budget and kept.unique().numel() == budget, what
    dropped = torch.ones_like(scores, dtype=torch.bool)
    dropped[kept] = False
    if bool(dropped.any()):
        assert float(scores[kept].min()) >= float(scores[dropped].max()) - 1e-9 * float(scores.max()), what


def _assert_copies(segment_head, keys, values, beta, index, what: str) -> None:
    """The segment's entries are the span's entries at `index`, bit for bit (eviction keeps what it keeps)."""
    seg_keys, seg_values, seg_beta = segment_head
    assert torch.equal(seg_keys, keys[index]), what
    assert torch.equal(seg_values, values[index]), what
    assert torch.equal(seg_beta, beta[index]), what


def _check_eviction(run: dict, plan: dict, method: str, scale: float) -> int:
    segment = _segment(run, plan)
    checked = 0
    for layer, captured in enumerate(plan["layers"]):
        num_kv_heads = captured["keys"].shape[0]
        for head in range(num_kv_heads):
            what = f"{plan['rid']} step {plan['step']} layer {layer} head {head} ({method})"
            keys, values, beta, positions = _span_entries(run, plan, layer, head)
            budget = plan["head_budgets"][layer][head]
            kept_positions = segment["positions"][layer][head]
            index = torch.searchsorted(positions, kept_positions)
            assert torch.equal(positions[index.clamp(max=len(positions) - 1)], kept_positions), what
            if method == "recent":
                assert torch.equal(index, torch.arange(len(positions) - budget, len(positions))), what
            else:
                queries = _head_queries(captured["queries"], num_kv_heads)[head]
                scores = _rms_scores(queries, keys, scale)
                pooled = F.max_pool1d(scores[None, None], SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2)[0, 0]
                _assert_top_set(pooled, index, budget, what)
            _assert_copies(segment["layers"][layer][head], keys, values, beta, index, what)
            checked += 1
    return checked


def _check_am(run: dict, plan: dict, method: str, scale: float, options: dict) -> int:
    """The library's solver on this request's own inputs alone, in float64, heads in (layer, head) order."""
    segment = _segment(run, plan)
    num_kv_heads = plan["layers"][0]["keys"].shape[0]
    heads = [(layer, head) for layer in range(len(plan["layers"])) for head in range(num_kv_heads)]
    spans = [_span_entries(run, plan, layer, head) for layer, head in heads]
    queries = [_head_queries(plan["layers"][layer]["queries"], num_kv_heads)[head] for layer, head in heads]
    assert all(bool((s[2] == 0).all()) for s in spans), "first compactions only: no existing beta"
    batch = HeadBatch(
        keys=torch.stack([s[0] for s in spans]).double(), values=torch.stack([s[1] for s in spans]).double(),
        queries=torch.stack(queries).double(), scale=scale,
        budget=torch.tensor([plan["head_budgets"][layer][head] for layer, head in heads]),
    )
    result = compact_heads(batch, method, **options)
    checked = 0
    for row, (layer, head) in enumerate(heads):
        what = f"{plan['rid']} step {plan['step']} layer {layer} head {head} ({method})"
        keys, values, _, positions = spans[row]
        indices, _, beta, _ = result.head(row)
        assert torch.equal(segment["positions"][layer][head], positions[indices]), what
        seg_keys, seg_values, seg_beta = segment["layers"][layer][head]
        assert torch.equal(seg_keys, keys[indices]) and torch.equal(seg_values, values[indices]), what
        assert torch.allclose(seg_beta.double(), beta.double(), atol=2e-3, rtol=1e-3), what
        checked += 1
    return checked


def _check_plan(run: dict, plan: dict, method: str) -> int:
    config = CompactionConfig(enabled=True, **COMPACTION)
    scale = 1.0 / math.sqrt(plan["layers"][0]["keys"].shape[2])
    if method == "am-highest-attention":
        return _check_am(run, plan, method, scale, config.method_options(method))
    return _check_eviction(run, plan, method, scale)


def test_each_segment_of_the_pressure_step_is_its_method_on_the_requests_own_kv(pressure_run):
    checked = sum(_check_plan(pressure_run, plan, FIRST_METHOD[plan["rid"]]) for plan in _pressure_step(pressure_run))
    assert checked == 4 * 4 * 2  # requests x layers x KV heads


def test_every_recompaction_keeps_the_newest_entries_of_its_request(pressure_run):
    """Later compactions under pressure fold the old segment in; these requests no longer capture reference
    queries by then, so they keep the newest entries (old ones with their beta)."""
    recompactions = [p for p in _plans(pressure_run) if p["prev_end_block"] > p["start_block"]]
    assert len({p["rid"] for p in recompactions}) >= 3
    for plan in recompactions:
        assert plan["layers"][0]["queries"] is None, plan["rid"]
        assert _check_plan(pressure_run, plan, "recent") == 8


# ---- answers ----------------------------------------------------------------------------------------------------


def test_answers_equal_those_of_each_request_compacted_alone(pressure_run, alone_run):
    for rid, record in pressure_run["requests"].items():
        alone = alone_run["requests"][rid]
        assert [e["computed_before"] for e in alone["events"]] == [e["computed_before"] for e in record["events"]]
        assert alone["token_ids"] == record["token_ids"], rid
    # The roomy run reused no freed source page as a destination in the step that freed it.
    by_step: dict[int, list[dict]] = {}
    for plan in alone_run["plans"]:
        by_step.setdefault(plan["step"], []).append(plan)
    for plans in by_step.values():
        sources = {page for p in plans for page in p["source_block_ids"]}
        assert not any(sources & set(p["dest_block_ids"]) for p in plans)
