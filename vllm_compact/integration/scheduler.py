"""Scheduler side of compaction: decide which requests shrink, move their pages, attach plans to the step.

Planning happens BEFORE vLLM schedules the step: the destination pages come from the pool and the compacted blocks
leave the request's block table. Only pages that were full before the step are compacted, and the worker executes
the plans before the step writes any KV (synchronous scheduling). The source pages (and a re-compacted segment's old
pages) go back to the pool only when the step's output reports the compact pages written; any other plan (failed,
or not reported at all: fail closed) is undone, and the request goes on with the pages it had. Under memory pressure
this very step needs the pages, so they are freed at planning; the worker's last resort for such a plan is a copy of
the span's newest keys (core/compactor.py), and if it is not reported written the request is recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from vllm.logger import init_logger
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from vllm_compact.config import CompactionConfig, config_from_env
from vllm_compact.core.budgets import HeadBudgetPolicy
from vllm_compact.core.plan import CompactionReport, CompactionStep, RequestCompactionPlan
from vllm_compact.core.planner import CompactedSpan, CompactionPlanner, PagePlan, RequestLengths
from vllm_compact.core.request_overrides import request_config
from vllm_compact.core.stats import SchedulerCompactionStats
from vllm_compact.core.stats_file import StatsFileWriter, worker_stats
from vllm_compact.head_table import read_model_config, resolve_head_budgets
from vllm_compact.integration.prefix_cache import CompactionPrefixCacheGuard
from vllm_compact.integration.engine_support import check_engine_supported

logger = init_logger(__name__)

# A request whose compaction the worker fails this many times in a row is served uncompacted from then on.
MAX_ROLLBACKS = 3


def _extended(cls, base: type, obj, **extra):
    """`obj` (a `base` dataclass) as its subclass `cls`, with `extra` declared fields set."""
    return cls(**{f.name: getattr(obj, f.name) for f in fields(base)}, **extra)


@dataclass
class CompactionSchedulerOutput(SchedulerOutput):
    """vLLM's step output with this step's compaction work as a declared field (pickled to the workers with it)."""

    kv_compaction: CompactionStep | None = None

    @classmethod
    def of(cls, output: SchedulerOutput, step: CompactionStep) -> CompactionSchedulerOutput:
        return _extended(cls, SchedulerOutput, output, kv_compaction=step)


def compaction_step(output: SchedulerOutput) -> CompactionStep | None:
    """The compaction work a step carries (None for stock steps)."""
    return output.kv_compaction if isinstance(output, CompactionSchedulerOutput) else None


@dataclass
class CompactionModelRunnerOutput(ModelRunnerOutput):
    """vLLM's step result with the worker's report on this step's plans (pickled back to the scheduler with it)."""

    kv_compaction: CompactionReport | None = None

    @classmethod
    def of(cls, output: ModelRunnerOutput, report: CompactionReport) -> CompactionModelRunnerOutput:
        return _extended(cls, ModelRunnerOutput, output, kv_compaction=report)


def compaction_report(output: ModelRunnerOutput) -> CompactionReport | None:
    """The worker's report; None for an output without one (a model runner that is not ours, an output of another
    type): it wrote nothing, and the step's plans are undone."""
    return output.kv_compaction if isinstance(output, CompactionModelRunnerOutput) else None


@dataclass
class HeldPages:
    """A planned compaction's pages, until the worker reports: the source blocks (logical order) and the span before
    the plan (its pages, for a re-compaction)."""

    plan: PagePlan
    source: list[KVCacheBlock]
    old_span: CompactedSpan | None


class CompactionScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = config_from_env()
        self.compaction_config: CompactionConfig = config or CompactionConfig(enabled=False)
        if self.compaction_config.enabled:
            # Refused, never silently disabled: the server would still say compaction is on. `vllm-compact serve`
            # refused most of these before loading the model; the offline LLM API first meets them here.
            check_engine_supported(self.vllm_config, self.kv_cache_config)
        self.compaction_active = self.compaction_config.enabled
        if self.scheduler_config.async_scheduling and self.compaction_active:
            # Freed source pages could be rewritten while an in-flight step still reads them.
            logger.warning("vllm-compact: async scheduling is not supported with compaction; compaction disabled")
            self.compaction_active = False
        self.compaction_stats = SchedulerCompactionStats()
        self._request_configs: dict[str, CompactionConfig] = {}
        self._held: dict[str, HeldPages] = {}
        self._sent: dict[str, RequestCompactionPlan] = {}  # plans sent to the worker and not settled yet
        self._cancelled: list[str] = []  # plans undone here: the next step tells the worker to drop them
        self._rollbacks: dict[str, int] = {}
        self.stats_writer = StatsFileWriter.from_env() if self.compaction_active else None
        self.prefix_guard = CompactionPrefixCacheGuard(self.kv_cache_manager) if self.compaction_active else None
        if self.compaction_active:
            model_config = self.vllm_config.model_config
            parallel = self.vllm_config.parallel_config
            self._resolve_head_budgets(model_config)
            self.planner = CompactionPlanner(HeadBudgetPolicy(
                num_layers=model_config.get_num_layers(parallel),
                num_kv_heads=model_config.get_num_kv_heads(parallel),
                ratio=self.compaction_config.ratio,
                table_path=self.compaction_config.head_budget_file,
            ), self.block_size)
            logger.info("vllm-compact: compaction active: %s", self.compaction_config.model_dump_json())

    def _resolve_head_budgets(self, model_config) -> None:
        """head_budget_file unset (the offline LLM API; `serve` resolves it before): the table shipped for the
        model, by its config.json or vLLM's hf_config; the log says which table is in use."""
        cfg = self.compaction_config
        hf = getattr(model_config, "hf_config", None)
        model_dict = read_model_config(model_config.model) or (hf.to_dict() if hf is not None else None)
        path, how = resolve_head_budgets(cfg.head_budget_file, model_config.model, model_dict)
        if cfg.head_budget_file is None and path is not None:
            self.compaction_config = cfg.model_copy(update={"head_budget_file": path})
        logger.info("vllm-compact: head budgets: %s", how)

    # ---- the step ---------------------------------------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        plans: list[RequestCompactionPlan] = []
        if self.compaction_active:
            plans = self._plan_compactions()
        output = super().schedule(*args, **kwargs)
        if plans:
            # A request preempted while scheduling this step has dropped its compaction state and pages already.
            plans = [p for p in plans if p.req_id in self.planner.spans]
        self._sent.update((p.req_id, p) for p in plans)
        if plans or self._cancelled:
            step = CompactionStep(plans=plans, cancelled=tuple(self._cancelled))
            output = CompactionSchedulerOutput.of(output, step)
            self._cancelled.clear()
        if self.stats_writer is not None:
            self._export_stats(force=bool(plans))
        return output

    # ---- planning ---------------------------------------------------------------------------------------------

    @property
    def _block_pool(self):
        return self.kv_cache_manager.block_pool

    def _req_blocks(self, req_id: str) -> list:
        return self.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[req_id]

    def _request_config(self, request: Request) -> CompactionConfig:
        """The server's settings narrowed by the request's `kv_compaction_*` extra args.

        A bad value never gets here through vLLM's front ends: the admission hook (integration/request_validation.py)
        refused it before the request was sent to the engine core. A request added to the core some other way
        with a value that does not parse is served without compaction (never with settings it did not ask for),
        and nothing raised here can reach the engine loop.
        """
        cfg = self._request_configs.get(request.request_id)
        if cfg is None:
            extra = request.sampling_params.extra_args if request.sampling_params is not None else None
            try:
                cfg = request_config(self.compaction_config, extra)
            except Exception as e:  # noqa: BLE001 - one request's arguments must not stop the engine
                logger.error("vllm-compact: request %s: %s; serving it without compaction", request.request_id, e)
                cfg = self.compaction_config.model_copy(update={"enabled": False})
            self._request_configs[request.request_id] = cfg
        return cfg

    def _plan_compactions(self) -> list[RequestCompactionPlan]:
        pool = self._block_pool
        under_pressure = self.compaction_config.memory_pressure and self.planner.under_pressure(
            pool.get_num_free_blocks(), len(self.running), self.scheduler_config.max_num_batched_tokens,
            self.block_size)
        # A request whose plan is still in flight (layer chunks over several steps) is not planned again until it lands.
        requests = [(RequestLengths(r.request_id, r.num_computed_tokens, r.num_prompt_tokens), self._request_config(r))
                    for r in self.running if r.status == RequestStatus.RUNNING and r.request_id not in self._sent]
        free_share = pool.get_num_free_blocks() / max(1, pool.num_gpu_blocks - 1)  # the null page is never free
        plans = [self._move_pages(p)
                 for p in self.planner.plan(requests, pool.get_num_free_blocks(), under_pressure, free_share)]
        if under_pressure:
            self.compaction_stats.pressure_steps += 1
        return plans

    def _move_pages(self, plan: PagePlan) -> RequestCompactionPlan:
        """Carry out a page plan on vLLM's block pool: fresh pages for the segment; the compacted blocks leave the
        request's table and are held, with the old segment's pages, until the worker reports (`_settle`), or freed
        now under memory pressure."""
        pool = self._block_pool
        old = self.planner.spans.get(plan.req_id)
        # Destination pages first, so they can never alias a source page the worker still has to read.
        dest = pool.get_new_blocks(plan.pages_needed)
        blocks = self._req_blocks(plan.req_id)
        source = blocks[plan.prev_end_block : plan.end_block]
        for i in range(plan.prev_end_block, plan.end_block):
            blocks[i] = pool.null_block
        if plan.release_now:
            self._release_replaced(plan, source, old)
        else:
            self._held[plan.req_id] = HeldPages(plan, source, old)
        self.planner.record(plan, [b.block_id for b in dest])
        self.prefix_guard.freeze(plan.req_id)
        self.compaction_stats.plans += 1
        return RequestCompactionPlan(
            req_id=plan.req_id,
            start_block=plan.start_block,
            prev_end_block=plan.prev_end_block,
            end_block=plan.end_block,
            source_block_ids=tuple(b.block_id for b in source),
            dest_block_ids=tuple(b.block_id for b in dest),
            head_budgets=plan.head_budgets,
            method=plan.method,
            sources_released=plan.release_now,
        )

    # ---- the worker's report ----------------------------------------------------------------------------------

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput):
        step = compaction_step(scheduler_output)
        settle = bool(self._sent)
        if settle:
            self._settle(compaction_report(model_runner_output))
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if (step is not None or settle) and self.stats_writer is not None:
            self._export_stats(force=True)  # the settled counters, before the engine may go idle
        return outputs

    def _settle(self, report: CompactionReport | None) -> None:
        """Fail closed, for every plan sent and not yet settled: free what a plan reported WRITTEN replaced; keep
        a PENDING plan's pages held (the worker carries it over several steps); undo every other plan (failed, left
        out of the report, or no report at all) and tell the worker to drop it. A plan under memory pressure gave
        its pages back at planning and cannot be undone: unwritten, its request is preempted and recomputes its KV
        (`_recompute_lost`). A request that ended since its plan was made has settled its pages already
        (`_free_request_blocks`)."""
        written = frozenset(report.written) if report is not None else frozenset()
        pending = frozenset(report.pending) if report is not None else frozenset()
        failed = frozenset(report.failed) if report is not None else frozenset()
        unreported = [r for r in self._sent if r not in written | pending | failed]
        if unreported:
            logger.error("vllm-compact: the worker reported nothing for the compaction plans of %s (%s); undoing them",
                         unreported, "the step's output carries no compaction report" if report is None
                         else "left out of its report")
        pool = self._block_pool
        for plan in list(self._sent.values()):
            if plan.req_id in pending:
                continue
            del self._sent[plan.req_id]
            if plan.req_id not in written and plan.req_id not in failed:
                self._cancelled.append(plan.req_id)  # the worker may still hold it in flight
            if plan.sources_released:
                if plan.req_id not in written:
                    self._recompute_lost(plan)
                continue
            held = self._held.pop(plan.req_id, None)
            if held is None:
                continue
            if plan.req_id in written:
                self._release_replaced(held.plan, held.source, held.old_span)
                self._rollbacks.pop(plan.req_id, None)
                continue
            blocks = self._req_blocks(plan.req_id)
            blocks[plan.prev_end_block : plan.end_block] = held.source
            pool.free_blocks(self._span_blocks(self.planner.restore(plan.req_id, held.old_span)))
            self.compaction_stats.rollbacks += 1
            self._count_failure(plan.req_id)

    def _count_failure(self, req_id: str) -> None:
        self._rollbacks[req_id] = self._rollbacks.get(req_id, 0) + 1
        if self._rollbacks[req_id] >= MAX_ROLLBACKS:
            logger.error("vllm-compact: request %s failed to compact %d times; serving it without compaction",
                         req_id, MAX_ROLLBACKS)
            cfg = self._request_configs.get(req_id, self.compaction_config)
            self._request_configs[req_id] = cfg.model_copy(update={"enabled": False})

    def _recompute_lost(self, plan: RequestCompactionPlan) -> None:
        """A plan made under memory pressure was not written: its source pages went back to the pool at planning
        (this step may have reused them) and its destination pages hold nothing, so the span's KV is lost. The
        request is preempted as vLLM preempts for lack of pages: every page back to the pool, its compaction state
        dropped (here and, through the next step's preempted ids, in the worker), and this step's output for it
        discarded (it read the lost span); it is then recomputed from its tokens."""
        self.compaction_stats.lost_plans += 1
        # Counted as compacted at planning (`_release_replaced`); its pages did go back to the pool.
        self.compaction_stats.tokens_compacted -= (plan.end_block - plan.prev_end_block) * self.block_size
        request = self.requests.get(plan.req_id)
        if request is None or request.status != RequestStatus.RUNNING:
            logger.error("vllm-compact: the compaction of %s under memory pressure was not written; the request has "
                         "ended and released its pages", plan.req_id)
            return
        logger.error("vllm-compact: the compaction of %s under memory pressure was not written and its source pages "
                     "are gone; preempting it to recompute its KV", plan.req_id)
        self._count_failure(plan.req_id)
        self.running.remove(request)
        self._preempt_request(request, time.monotonic(), drop_stale_output=True)
        # As vLLM's reset_prefix_cache does: the worker is sent the request's tokens again when it resumes, so the
        # token it sampled this step (now discarded) is dropped there too.
        self.prev_step_scheduled_req_ids.discard(request.request_id)

    def _span_blocks(self, span: CompactedSpan | None) -> list[KVCacheBlock]:
        return [self._block_pool.blocks[i] for i in span.page_ids] if span is not None else []

    def _replaced_blocks(self, source: list[KVCacheBlock], old_span: CompactedSpan | None) -> list[KVCacheBlock]:
        """What a plan replaces: its source blocks and, for a re-compaction, the old segment's pages."""
        return source + self._span_blocks(old_span)

    def _release_replaced(self, plan: PagePlan, source: list[KVCacheBlock], old_span: CompactedSpan | None) -> None:
        """The plan's segment stands (written, or under pressure about to be): what it replaced goes to the pool."""
        self._block_pool.free_blocks(self._replaced_blocks(source, old_span))
        self.compaction_stats.record_written(plan.new_tokens, plan.pages_freed)

    # ---- release ----------------------------------------------------------------------------------------------

    def _free_request_blocks(self, request: Request):
        if self.stats_writer is not None:
            if request.is_finished():
                self.stats_writer.finish_request(request.request_id, *self._lengths(request))
            else:
                self.stats_writer.forget_request(request.request_id)
        if request.is_finished():
            self._request_configs.pop(request.request_id, None)
            self._rollbacks.pop(request.request_id, None)
        if self.compaction_active:
            # Ended before its plan was answered (preempted inside the planning schedule(), or aborted): the plan
            # never runs or is dropped, so the held pages simply go back with the rest.
            held = self._held.pop(request.request_id, None)
            self._sent.pop(request.request_id, None)
            pages = self._span_blocks(self.planner.forget(request.request_id))
            if held is not None:
                pages += self._replaced_blocks(held.source, held.old_span)
            self._block_pool.free_blocks(pages)
            self.prefix_guard.release(request.request_id)
        super()._free_request_blocks(request)

    # ---- accounting -------------------------------------------------------------------------------------------

    def physical_tokens(self, request: Request) -> int:
        """Tokens' worth of KV pages the request holds now (compact pages counted whole)."""
        if not self.compaction_active:
            return request.num_computed_tokens
        return self.planner.physical_tokens(request.request_id, request.num_computed_tokens)

    def compactions(self, request: Request) -> int:
        return self.planner.compactions(request.request_id) if self.compaction_active else 0

    def _lengths(self, request: Request) -> tuple[int, int, int]:
        return request.num_computed_tokens, self.physical_tokens(request), self.compactions(request)

    def _export_stats(self, force: bool) -> None:
        for request in self.running:
            self.stats_writer.track_request(request.request_id, *self._lengths(request))
        self.stats_writer.maybe_write(self._stats_snapshot, force=force)

    def _stats_snapshot(self) -> dict:
        logical = sum(r.num_computed_tokens for r in self.running)
        physical = sum(self.physical_tokens(r) for r in self.running)
        pool = self._block_pool
        return {
            "config": self.compaction_config.model_dump(),
            "scheduler": self.compaction_stats.as_dict(),
            # The worker writes its counters to a file of its own (it may be another process); readers merge it.
            "worker": worker_stats(compactions=0, failures=0, heads_fell_back=0, seconds=()),
            "totals": {"logical_tokens": logical, "physical_tokens": physical, "running_requests": len(self.running)},
            "pool": {"free_pages": pool.get_num_free_blocks(), "total_pages": pool.num_gpu_blocks},
        }
