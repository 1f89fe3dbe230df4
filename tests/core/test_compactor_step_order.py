"""One compactor step whose plans share pages, without vLLM: a pool of pages in a plain layout, plans made by hand.

Under memory pressure a plan's source pages are back in the pool at planning and may be the destination of a later
plan of the same step. Whatever methods the step mixes (a per-request method, the `recent` fallback of a request
without reference queries), and with a plan carried over several steps (layers_per_step) beside them, every plan's
segment must be what the same plan makes alone of untouched pages.
"""

from __future__ import annotations

import torch

from vllm_compact.config import CompactionConfig
from vllm_compact.core.compactor import ModelGeometry, SegmentCompactor, read_segment_head
from vllm_compact.core.compact_pages import page_view
from vllm_compact.core.plan import CompactionStep, RequestCompactionPlan
from vllm_compact.core.state import QueryReservoir, WorkerCompactionState, WorkerRequest
from vllm_compact.core.stock_pages import StockBlockLayout

LAYERS, KV_HEADS, Q_HEADS, BLOCK, DIM, PAGES = 2, 2, 4, 4, 8, 24
BUDGETS = ((4, 4), (3, 5))  # [layer][KV head] entries of a 3-block span: one compact page per layer


def _plain_layout() -> StockBlockLayout:
    """Blocks [Hkv, bs, 2D]: key (h, s, d) at h*bs*2D + s*2D + d, its value D further."""
    h, s, d = torch.meshgrid(torch.arange(KV_HEADS), torch.arange(BLOCK), torch.arange(DIM), indexing="ij")
    keys = h * BLOCK * 2 * DIM + s * 2 * DIM + d
    return StockBlockLayout(keys, keys + DIM)


def _compactor(with_queries: tuple[str, ...]) -> SegmentCompactor:
    """A pool of random pages (seeded: every call holds the same KV) and requests, with reference queries or not."""
    generator = torch.Generator().manual_seed(0)
    state = WorkerCompactionState(config=CompactionConfig(enabled=True))
    state.num_layers, state.block_size = LAYERS, BLOCK
    state.layer_caches = [torch.randn(PAGES, KV_HEADS, BLOCK, 2 * DIM, generator=generator) for _ in range(LAYERS)]
    for req_id in ("held", "fallback", "snapkv", "recent"):
        record = state.requests[req_id] = WorkerRequest(captures=req_id in with_queries)
        if record.captures:
            record.reservoir = QueryReservoir(LAYERS, capacity=6, num_heads=Q_HEADS, head_dim=DIM,
                                              dtype=torch.float32)
            for layer in range(LAYERS):
                record.reservoir.append(layer, torch.randn(6, Q_HEADS, DIM, generator=generator))
    geometry = ModelGeometry(num_layers=LAYERS, num_kv_heads=KV_HEADS, num_q_heads=Q_HEADS, head_dim=DIM,
                             block_size=BLOCK, scales=(DIM ** -0.5,) * LAYERS)
    return SegmentCompactor(state, _plain_layout(), geometry)


def _plan(req_id: str, method: str, sources: tuple[int, ...], dest: int, released: bool) -> RequestCompactionPlan:
    return RequestCompactionPlan(req_id=req_id, start_block=0, prev_end_block=0, end_block=len(sources),
                                 source_block_ids=sources, dest_block_ids=(dest,), head_budgets=BUDGETS,
                                 method=method, sources_released=released)


HELD = _plan("held", "am-highest-attention", (0, 1, 2), 3, released=False)  # runs one layer per step
# Made under pressure in the order below: "recent" got page 9, freed by "snapkv", as its destination.
PRESSURE_STEP = [
    _plan("fallback", "am-highest-attention", (4, 5, 6), 7, released=True),  # no queries: `recent`
    _plan("snapkv", "snapkv", (8, 9, 10), 11, released=True),
    _plan("recent", "recent", (12, 13, 14), 9, released=True),
]
WITH_QUERIES = ("held", "snapkv")


def _segment(compactor: SegmentCompactor, req_id: str) -> list:
    segment = compactor.state.segment(req_id)
    assert segment is not None, f"{req_id}: no segment installed"
    return [read_segment_head(segment, page_view(compactor.state.layer_caches[layer]), layer, head)
            for layer in range(LAYERS) for head in range(KV_HEADS)]


def _alone(plan: RequestCompactionPlan, layers_per_step: int) -> list:
    """The plan's segment when it is the only plan, on untouched pages."""
    compactor = _compactor(WITH_QUERIES)
    report = compactor.execute(CompactionStep(plans=[plan]), layers_per_step)
    while report.pending:
        report = compactor.execute(CompactionStep(), layers_per_step)
    assert report.written == (plan.req_id,)
    return _segment(compactor, plan.req_id)


def test_plans_sharing_pages_in_one_step_each_get_their_own_segment():
    assert set(PRESSURE_STEP[2].dest_block_ids) & set(PRESSURE_STEP[1].source_block_ids), "the pages must be shared"
    compactor = _compactor(WITH_QUERIES)
    first = compactor.execute(CompactionStep(plans=[HELD]), layers_per_step=1)
    assert first.pending == ("held",)
    report = compactor.execute(CompactionStep(plans=PRESSURE_STEP), layers_per_step=1)
    assert sorted(report.written) == ["fallback", "held", "recent", "snapkv"] and not report.failed
    assert compactor.state.stats.failures == 0
    for plan, layers_per_step in [(HELD, 1), *((p, 0) for p in PRESSURE_STEP)]:
        expected = _alone(plan, layers_per_step)
        got = _segment(compactor, plan.req_id)
        for row, (want, have) in enumerate(zip(expected, got)):
            layer, head = divmod(row, KV_HEADS)
            for a, b in zip(want, have):
                assert torch.equal(a, b), f"{plan.req_id}: layer {layer} head {head}"


def test_every_solved_head_is_counted_once_by_what_compacted_it():
    """AM heads are fitted or fell back (its guard); heads of eviction plans (snapkv, recent, the recent fallback of
    a request without queries) are evicted."""
    compactor = _compactor(WITH_QUERIES)
    compactor.execute(CompactionStep(plans=[HELD]), layers_per_step=0)
    stats = compactor.state.stats
    assert stats.heads_fitted + stats.heads_fell_back == LAYERS * KV_HEADS and stats.heads_evicted == 0
    compactor.execute(CompactionStep(plans=PRESSURE_STEP), layers_per_step=0)
    assert stats.heads_fitted + stats.heads_fell_back == LAYERS * KV_HEADS
    assert stats.heads_evicted == len(PRESSURE_STEP) * LAYERS * KV_HEADS
