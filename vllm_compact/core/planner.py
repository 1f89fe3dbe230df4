"""Which requests compact this step, over which blocks, with how many entries per head and how many pages.

Engine-independent: request lengths, settings and the free page count in, page plans out. The integration's
scheduler turns a page plan into block-pool moves (integration/scheduler.py). Only blocks that were full before the
step are planned, so the worker can compact them before the step writes any KV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vllm_compact.am.methods import method_class
from vllm_compact.config import CompactionConfig
from vllm_compact.core.budgets import Budgets, HeadBudgetPolicy


@dataclass(frozen=True)
class RequestLengths:
    """What the planner needs to know of one running request."""

    req_id: str
    computed_tokens: int  # KV written before this step
    prompt_tokens: int


@dataclass
class CompactedSpan:
    """What is known of one request's compact segment: logical blocks [start_block, end_block) live in page_ids."""

    start_block: int
    end_block: int
    page_ids: list[int]
    head_budgets: Budgets
    compactions: int = 1


@dataclass(frozen=True)
class PagePlan:
    """One compaction to carry out: blocks [prev_end_block, end_block) join the segment over [start_block, ...).

    The old segment's pages (if any) and the new blocks are replaced by `pages_needed` fresh pages.
    """

    req_id: str
    start_block: int
    prev_end_block: int
    end_block: int
    head_budgets: Budgets
    pages_needed: int
    pages_freed: int  # net: new blocks + old pages - pages_needed (> 0)
    method: str
    new_tokens: int
    release_now: bool = False  # under memory pressure: the step needs the freed pages, before the worker has run


def may_compact_again(cfg: CompactionConfig, final_tokens: int, block_size: int, compacted_until: int = 0) -> bool:
    """Whether a request that will hold `final_tokens` (prompt + max tokens) can still be planned a compaction that
    reads reference queries, without memory pressure; `compacted_until` is the end of its segment (tokens, 0 if
    none). The worker captures queries only for such requests: the others never read them (under pressure they
    are compacted by position, the way a request without queries is)."""
    method = method_class(cfg.method)
    if not cfg.enabled or not method.compacts or not method.needs_queries:
        return False
    if compacted_until > 0 and not cfg.recompact:
        return False
    start = max(math.ceil(cfg.protected_initial_tokens / block_size) * block_size, compacted_until)
    end = (final_tokens - cfg.recent_window_tokens) // block_size * block_size
    return end - start >= cfg.trigger_tokens


class CompactionPlanner:
    def __init__(self, policy: HeadBudgetPolicy, block_size: int) -> None:
        self.policy = policy
        self.block_size = block_size
        self.spans: dict[str, CompactedSpan] = {}

    # ---- when ------------------------------------------------------------------------------------------------

    @staticmethod
    def under_pressure(free_pages: int, running: int, max_batched_tokens: int, block_size: int) -> bool:
        """Pages this step may need: one per running request (decode) plus one prefill budget's worth."""
        return free_pages < running + math.ceil(max_batched_tokens / block_size)

    def _due(self, request: RequestLengths, cfg: CompactionConfig, under_pressure: bool,
             free_share: float) -> tuple[int, int, int] | None:
        """(start_block, prev_end_block, end_block) if the request should compact now."""
        if not cfg.enabled or not method_class(cfg.method).compacts:
            return None
        if not under_pressure and free_share >= cfg.pool_watermark:
            return None  # memory is not short: the solve would cost time and buy nothing
        bs = self.block_size
        head_blocks = math.ceil(cfg.protected_initial_tokens / bs)
        end_block = (request.computed_tokens - cfg.recent_window_tokens) // bs
        span = self.spans.get(request.req_id)
        prev_end = span.end_block if span else head_blocks
        new_blocks = end_block - prev_end
        if new_blocks <= 0:
            return None
        if span is not None and not cfg.recompact:
            return None
        if not under_pressure and new_blocks * bs < cfg.trigger_tokens:
            return None
        if not under_pressure and not cfg.compact_during_prefill and request.computed_tokens < request.prompt_tokens:
            return None  # with room to spare, wait for the whole prompt: its end is what the answer will ask
        return head_blocks, prev_end, end_block

    # ---- what ------------------------------------------------------------------------------------------------

    def plan(
        self, requests: list[tuple[RequestLengths, CompactionConfig]], free_pages: int, under_pressure: bool,
        free_share: float = 0.0,
    ) -> list[PagePlan]:
        """Plans for this step, largest gain first, each fitting in the pages left by the ones before. The pages a
        plan frees come back once the worker has written it, or, under pressure, at once (`release_now`). Records
        every planned request's new span (call `restore` to undo a plan, `forget` when a request releases its
        pages)."""
        due = [(r, cfg, blocks) for r, cfg in requests
               if (blocks := self._due(r, cfg, under_pressure, free_share)) is not None]
        due.sort(key=lambda item: item[2][2] - item[2][1], reverse=True)
        plans = []
        for request, cfg, (start, prev_end, end) in due:
            plan = self._plan_one(request.req_id, cfg, start, prev_end, end, free_pages, under_pressure)
            if plan is None:
                continue
            free_pages += plan.pages_freed if under_pressure else -plan.pages_needed
            plans.append(plan)
        return plans

    def _plan_one(self, req_id: str, cfg: CompactionConfig, start: int, prev_end: int, end: int,
                  free_pages: int, release_now: bool) -> PagePlan | None:
        bs = self.block_size
        span = self.spans.get(req_id)
        new_tokens = (end - prev_end) * bs
        budgets = self.policy.budgets((end - start) * bs, new_tokens, span.head_budgets if span else None,
                                      ratio=cfg.ratio)
        pages_needed = self.policy.pages_needed(budgets, bs)
        old_pages = len(span.page_ids) if span else 0
        freed = end - prev_end + old_pages - pages_needed
        if freed <= 0 or pages_needed > free_pages:
            return None
        return PagePlan(req_id, start, prev_end, end, budgets, pages_needed, freed, cfg.method, new_tokens,
                        release_now)

    # ---- bookkeeping -----------------------------------------------------------------------------------------

    def record(self, plan: PagePlan, page_ids: list[int]) -> None:
        """The plan's pages were allocated: the request's segment now covers [start, end) in `page_ids`."""
        span = self.spans.get(plan.req_id)
        self.spans[plan.req_id] = CompactedSpan(plan.start_block, plan.end_block, page_ids, plan.head_budgets,
                                                compactions=span.compactions + 1 if span else 1)

    def restore(self, req_id: str, span: CompactedSpan | None) -> CompactedSpan | None:
        """Undo the request's last `record` (the worker could not write it): its span is `span` again. Returns the
        span the undone plan had made."""
        undone = self.spans.pop(req_id, None)
        if span is not None:
            self.spans[req_id] = span
        return undone

    def forget(self, req_id: str) -> CompactedSpan | None:
        """The request released its pages (finished, aborted or preempted); returns the span it held."""
        return self.spans.pop(req_id, None)

    def physical_tokens(self, req_id: str, computed_tokens: int) -> int:
        """Tokens' worth of KV pages the request holds (compact pages counted whole)."""
        span = self.spans.get(req_id)
        if span is None:
            return computed_tokens
        compacted = (span.end_block - span.start_block) * self.block_size
        return computed_tokens - compacted + len(span.page_ids) * self.block_size

    def compactions(self, req_id: str) -> int:
        span = self.spans.get(req_id)
        return span.compactions if span else 0
