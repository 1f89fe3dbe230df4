"""The planner alone (no vLLM): when a request compacts, over which blocks, and what it costs in pages, against
counts written out by hand for uniform budgets (entries per head = round(span / ratio); a layer packs its heads back
to back in pages of Hkv * block_size lanes)."""

from __future__ import annotations

import math

import pytest

from vllm_compact.config import CompactionConfig
from vllm_compact.core.budgets import HeadBudgetPolicy
from vllm_compact.core.planner import CompactionPlanner, RequestLengths

BS, LAYERS, HKV = 16, 2, 2


def _planner(ratio: float = 10.0) -> CompactionPlanner:
    return CompactionPlanner(HeadBudgetPolicy(num_layers=LAYERS, num_kv_heads=HKV, ratio=ratio), BS)


def _cfg(**kw) -> CompactionConfig:
    base = dict(enabled=True, ratio=10.0, trigger_tokens=256, recent_window_tokens=64, protected_initial_tokens=16)
    return CompactionConfig(**{**base, **kw})


def _pages_by_hand(span_tokens: int, ratio: float) -> int:
    per_head = max(1, round(span_tokens / ratio))
    return math.ceil(per_head * HKV / (HKV * BS))


def test_a_prompt_past_the_trigger_compacts_everything_but_the_head_and_the_recent_window():
    planner, cfg = _planner(), _cfg()
    (plan,) = planner.plan([(RequestLengths("a", 1000, 1000), cfg)], free_pages=100, under_pressure=False)
    assert (plan.start_block, plan.prev_end_block) == (1, 1)  # 16 protected tokens = 1 block
    assert plan.end_block == (1000 - 64) // BS  # only full blocks older than the recent window
    span = (plan.end_block - plan.start_block) * BS
    assert plan.head_budgets == ((round(span / 10),) * HKV,) * LAYERS
    assert plan.pages_needed == _pages_by_hand(span, 10)
    assert plan.pages_freed == plan.end_block - plan.prev_end_block - plan.pages_needed
    assert plan.method == cfg.method and plan.new_tokens == span


def test_below_the_trigger_nothing_is_planned_unless_memory_is_short():
    planner, cfg = _planner(), _cfg(trigger_tokens=1024)
    request = [(RequestLengths("a", 1000, 1000), cfg)]
    assert planner.plan(request, free_pages=100, under_pressure=False) == []
    assert len(planner.plan(request, free_pages=100, under_pressure=True)) == 1


def test_with_room_a_prompt_waits_for_its_last_chunk():
    planner = _planner()
    mid_prefill = RequestLengths("a", 1024, 3000)
    assert planner.plan([(mid_prefill, _cfg())], 100, under_pressure=False) == []
    assert len(planner.plan([(mid_prefill, _cfg())], 100, under_pressure=True)) == 1
    assert len(_planner().plan([(mid_prefill, _cfg(compact_during_prefill=True))], 100, False)) == 1


@pytest.mark.parametrize("kw", [dict(enabled=False), dict(method="none")])
def test_requests_that_do_not_compact_get_no_plan(kw):
    assert _planner().plan([(RequestLengths("a", 4000, 4000), _cfg(**kw))], 100, under_pressure=True) == []


def test_short_of_pages_the_largest_gain_goes_first_and_later_plans_fit_in_the_pages_left():
    """A plan's freed pages return only once the worker has written it: later plans of the step cannot use them."""
    cfg = _cfg()
    small, large = RequestLengths("small", 600, 600), RequestLengths("large", 3000, 3000)
    large_pages = _pages_by_hand(((3000 - 64) // BS - 1) * BS, 10)  # 19
    small_pages = _pages_by_hand(((600 - 64) // BS - 1) * BS, 10)  # 4
    plans = _planner().plan([(small, cfg), (large, cfg)], free_pages=large_pages + small_pages, under_pressure=False)
    assert [(p.req_id, p.pages_needed) for p in plans] == [("large", large_pages), ("small", small_pages)]
    plans = _planner().plan([(small, cfg), (large, cfg)], free_pages=large_pages + small_pages - 1,
                            under_pressure=False)
    assert [p.req_id for p in plans] == ["large"]
    plans = _planner().plan([(small, cfg), (large, cfg)], free_pages=large_pages - 1, under_pressure=False)
    assert [p.req_id for p in plans] == ["small"]


def test_restore_undoes_the_last_record():
    cfg = _cfg()
    planner = _planner()
    (first,) = planner.plan([(RequestLengths("a", 1000, 1000), cfg)], 100, under_pressure=False)
    planner.record(first, list(range(first.pages_needed)))
    before = planner.spans["a"]
    (second,) = planner.plan([(RequestLengths("a", 2000, 2000), cfg)], 100, under_pressure=False)
    planner.record(second, list(range(100, 100 + second.pages_needed)))
    undone = planner.restore("a", before)
    assert undone.page_ids == list(range(100, 100 + second.pages_needed)) and undone.compactions == 2
    assert planner.spans["a"] is before and planner.compactions("a") == 1
    assert planner.restore("a", None) is before and "a" not in planner.spans


def test_no_plan_that_frees_nothing():
    planner = _planner(ratio=1.0)
    assert planner.plan([(RequestLengths("a", 1000, 1000), _cfg(ratio=1.0))], 100, False) == []


def test_recompaction_extends_the_span_and_returns_the_old_pages():
    planner, cfg = _planner(), _cfg()
    (first,) = planner.plan([(RequestLengths("a", 1000, 1000), cfg)], 100, False)
    planner.record(first, page_ids=list(range(10, 10 + first.pages_needed)))
    assert planner.plan([(RequestLengths("a", 1100, 1000), cfg)], 100, False) == []  # 100 new tokens < trigger
    (second,) = planner.plan([(RequestLengths("a", 1500, 1000), cfg)], 100, False)
    assert (second.start_block, second.prev_end_block) == (first.start_block, first.end_block)
    assert second.pages_freed == second.end_block - first.end_block + first.pages_needed - second.pages_needed
    span = (second.end_block - second.start_block) * BS
    assert second.head_budgets == ((round(span / 10),) * HKV,) * LAYERS  # the whole span, old entries included
    planner.record(second, page_ids=list(range(second.pages_needed)))
    assert planner.compactions("a") == 2
    assert planner.plan([(RequestLengths("a", 3000, 1000), _cfg(recompact=False))], 100, False) == []


def test_physical_tokens_and_forget():
    planner, cfg = _planner(), _cfg()
    (plan,) = planner.plan([(RequestLengths("a", 1000, 1000), cfg)], 100, False)
    assert planner.physical_tokens("a", 1000) == 1000  # not recorded yet
    planner.record(plan, page_ids=[3])
    assert planner.physical_tokens("a", 1010) == 1010 - (plan.end_block - plan.start_block) * BS + BS
    span = planner.forget("a")
    assert span.page_ids == [3] and planner.forget("a") is None
    assert planner.physical_tokens("a", 1010) == 1010 and planner.compactions("a") == 0


def test_memory_pressure_is_fewer_free_pages_than_a_step_may_need():
    # one page per running request (decode) + one prefill budget of 512 tokens = 4 + 32 pages
    assert CompactionPlanner.under_pressure(free_pages=35, running=4, max_batched_tokens=512, block_size=BS)
    assert not CompactionPlanner.under_pressure(free_pages=36, running=4, max_batched_tokens=512, block_size=BS)


def test_compaction_by_length_waits_until_free_pages_fall_below_the_watermark():
    """Memory to spare: a request past the trigger is left alone (a solve would buy nothing); once the pool's free
    share falls below pool_watermark it compacts; under pressure it compacts whatever the watermark; 1 compacts
    every request past the trigger."""
    request = [(RequestLengths("a", 1000, 1000), _cfg(pool_watermark=0.25))]
    assert _planner().plan(request, free_pages=100, under_pressure=False, free_share=0.5) == []
    assert _planner().plan(request, free_pages=100, under_pressure=False, free_share=0.25) == []
    assert len(_planner().plan(request, free_pages=100, under_pressure=False, free_share=0.2)) == 1
    assert len(_planner().plan(request, free_pages=100, under_pressure=True, free_share=0.9)) == 1
    always = [(RequestLengths("a", 1000, 1000), _cfg(pool_watermark=1.0))]
    assert len(_planner().plan(always, free_pages=100, under_pressure=False, free_share=0.99)) == 1


def test_budgets_are_sized_once_per_distinct_request(monkeypatch):
    """The scheduler sizes a candidate plan for every running request at every pressure step; the same inputs come
    back step after step and must not be water-filled again, and the memoised answer is the computed one."""
    from vllm_compact.core.budgets import HeadBudgetPolicy
    from vllm_compact.head_table import shipped_tables

    policy = HeadBudgetPolicy(30, 3, 10.0, str(shipped_tables()["smollm2-135m"]))
    fresh = HeadBudgetPolicy(30, 3, 10.0, str(shipped_tables()["smollm2-135m"]))
    calls = []
    original = policy._budgets
    monkeypatch.setattr(policy, "_budgets", lambda *args: calls.append(args) or original(*args))
    first = policy.budgets(3840, 3840, None)
    for _ in range(5):
        assert policy.budgets(3840, 3840, None) == first
    recompacted = policy.budgets(4200, 360, first)
    assert len(calls) == 2
    assert first == fresh._budgets(3840, 3840, None, None)
    assert recompacted == fresh._budgets(4200, 360, first, None)
    assert policy.budgets(3840, 3840, None, ratio=20.0) != first and len(calls) == 3
