"""Every page comes back whatever ends a request at any point of a compaction's life.

vLLM's own scheduler with ours on top, driven step by step with hand-made model outputs (no model runs): the
stages are a compaction planned (its step not yet answered), executed (the step answered) and recompacted (a second
plan executed); the endings are an abort, a finish (a stop token sampled) and a preemption. Pages are counted in
vLLM's block pool.
"""

from __future__ import annotations

import time

import pytest
import torch

from vllm_compact.vllm_compat import patch_vllm_version

patch_vllm_version()

from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from vllm_compact.config import ENV_VAR, CompactionConfig  # noqa: E402
from vllm_compact.core.plan import CompactionReport  # noqa: E402
from vllm_compact.integration.scheduler import (  # noqa: E402
    CompactionModelRunnerOutput,
    CompactionScheduler,
    compaction_step,
)

BLOCK, TOKEN, STOP = 16, 7, 9
WORKER = object()  # Harness.answer: the report our worker would send


class Harness:
    """A CompactionScheduler over a pool of `num_blocks` pages and the loop an engine core runs around it."""

    def __init__(self, model_path: str, num_blocks: int, max_batched: int = 256, prefill_chunk: int = 0) -> None:
        model = ModelConfig(model=model_path, max_model_len=2048, dtype="float32")
        cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=False)
        cache.num_gpu_blocks = num_blocks
        config = VllmConfig(model_config=model, cache_config=cache, scheduler_config=SchedulerConfig(
            max_num_seqs=8, max_num_batched_tokens=max_batched, max_model_len=2048, is_encoder_decoder=False,
            long_prefill_token_threshold=prefill_chunk))
        layers = model.get_num_layers(config.parallel_config)
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=model.get_num_kv_heads(config.parallel_config),
                                 head_size=model.get_head_size(), dtype=torch.float32)
        kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn" for i in range(layers)], spec)])
        self.sched = CompactionScheduler(vllm_config=config, kv_cache_config=kv, block_size=BLOCK,
                                         structured_output_manager=StructuredOutputManager(config))
        assert self.sched.compaction_active
        self.pool = self.sched.kv_cache_manager.block_pool
        self.free_at_start = self.pool.get_num_free_blocks()
        self.output = None

    def add(self, req_id: str, prompt_tokens: int, max_tokens: int, extra_args: dict | None = None) -> Request:
        request = Request(req_id, [3 + i % 200 for i in range(prompt_tokens)],
                          SamplingParams(max_tokens=max_tokens, stop_token_ids=[STOP], extra_args=extra_args), None)
        self.sched.add_request(request)
        return request

    def schedule(self):
        self.output = self.sched.schedule()
        return compaction_step(self.output)

    def answer(self, stop: tuple[str, ...] = (), failed: tuple[str, ...] = (), report=WORKER) -> None:
        """The model's output for the last scheduled step: a token for each request past its prompt, and the
        worker's report as our worker makes it: every plan written but those of `failed`. `report=None`: the
        output carries no report (a model runner that is not ours); or the CompactionReport given."""
        ids = list(self.output.num_scheduled_tokens)
        sampled = []
        for req_id in ids:
            request = self.sched.requests.get(req_id)
            done_prefill = request is not None and request.num_computed_tokens >= request.num_prompt_tokens
            sampled.append([STOP if req_id in stop else TOKEN] if done_prefill else [])
        output = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                   sampled_token_ids=sampled)
        step = compaction_step(self.output)
        if report is WORKER:
            report = None if step is None else CompactionReport(
                written=tuple(p.req_id for p in step.plans if p.req_id not in failed), failed=failed)
        if report is not None:
            output = CompactionModelRunnerOutput.of(output, report)
        self.sched.update_from_output(self.output, output)

    def step(self, stop: tuple[str, ...] = ()):
        plan = self.schedule()
        self.answer(stop)
        return plan

    def until_plan_for(self, req_id: str, max_steps: int = 500):
        """Steps (answered) until one plans a compaction of `req_id`; that step is left unanswered."""
        for _ in range(max_steps):
            plan = self.schedule()
            if plan is not None and any(p.req_id == req_id for p in plan.plans):
                return plan
            self.answer()
        raise AssertionError(f"no compaction of {req_id} was planned")

    def run_to_the_end(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.sched.requests:
                return
            self.step()
        raise AssertionError("requests did not finish")

    def preempt(self, request: Request) -> None:
        """What vLLM's schedule() does to a request when pages run out."""
        self.sched.running.remove(request)
        self.sched._preempt_request(request, time.monotonic())

    def assert_everything_returned(self) -> None:
        assert self.pool.get_num_free_blocks() == self.free_at_start
        assert self.sched.planner.spans == {}
        assert self.sched._request_configs == {}


def _config(monkeypatch, **kw) -> None:
    # pool_watermark 1: these pools have room, and every request past the trigger must still compact.
    config = CompactionConfig(enabled=True, ratio=4, trigger_tokens=64, recent_window_tokens=32,
                              protected_initial_tokens=0, memory_pressure=False, pool_watermark=1.0, **kw)
    monkeypatch.setenv(ENV_VAR, config.to_env())


# vLLM preempts only inside schedule(): a planned compaction's preemption is the last test of this file.
STAGES, ENDINGS = ("planned", "executed", "recompacted"), ("abort", "finish", "preempt")
CASES = [(stage, ending) for stage in STAGES for ending in ENDINGS if (stage, ending) != ("planned", "preempt")]


@pytest.mark.parametrize("stage,ending", CASES)
def test_every_page_returns(stage, ending, monkeypatch, tiny_model_path):
    _config(monkeypatch)
    h = Harness(tiny_model_path, num_blocks=64)
    request = h.add("a", prompt_tokens=200, max_tokens=150)
    bystander = h.add("b", prompt_tokens=40, max_tokens=150, extra_args={"kv_compaction_enabled": False})
    h.until_plan_for("a")
    if stage in ("executed", "recompacted"):
        h.answer()
    if stage == "recompacted":
        h.until_plan_for("a")
        h.answer()
        assert h.sched.compactions(request) == 2
    held = len(h.sched.planner.spans["a"].page_ids)
    assert held > 0
    if ending == "abort":
        h.sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    elif ending == "finish":
        if stage != "planned":
            h.schedule()
        h.answer(stop=("a",))
        assert request.status == RequestStatus.FINISHED_STOPPED
    else:
        h.preempt(request)
    # Only the bystander holds pages now: its blocks, nothing of the compacted request.
    assert "a" not in h.sched.planner.spans
    bystander_blocks = len(h.sched.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks["b"])
    assert h.pool.get_num_free_blocks() == h.free_at_start - bystander_blocks
    if stage == "planned":
        h.answer()  # the step's output arrives for a request that has already ended
    h.run_to_the_end()
    assert bystander.status == RequestStatus.FINISHED_LENGTH_CAPPED
    if ending == "preempt":
        assert request.num_preemptions == 1 and request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    h.assert_everything_returned()


def test_a_request_preempted_in_the_step_that_planned_its_compaction_returns_every_page(monkeypatch,
                                                                                       tiny_model_path):
    """A long prompt prefilling next to "a" takes, in the very step that compacts "a", more pages than the
    compaction frees: vLLM preempts "a" inside schedule(), after our planning moved its pages. The plan must not
    reach the worker and the pages must all be back."""
    _config(monkeypatch)
    h = Harness(tiny_model_path, num_blocks=36, max_batched=512, prefill_chunk=256)
    h.add("b", prompt_tokens=500, max_tokens=5)
    request = h.add("a", prompt_tokens=200, max_tokens=40)
    h.step()  # both prefill: b its first chunk, a its whole prompt
    planned_before = h.sched.compaction_stats.plans
    plan = h.schedule()
    assert h.sched.compaction_stats.plans == planned_before + 1, "the scenario must plan a compaction of a"
    assert request.num_preemptions == 1, "the scenario must preempt a in the same step"
    assert plan is None or all(p.req_id != "a" for p in plan.plans)
    assert "a" not in h.sched.planner.spans
    h.answer()
    h.run_to_the_end()
    h.assert_everything_returned()


# How a step's output can leave a plan unwritten: the worker tried and failed; the output carries no report (a model
# runner that is not ours never executes a plan); the report leaves the plan out.
UNWRITTEN = {"failed": {"failed": ("a",)}, "no report": {"report": None}, "left out": {"report": CompactionReport()}}


@pytest.mark.parametrize("how", list(UNWRITTEN))
@pytest.mark.parametrize("compaction", ["first", "second"])
def test_a_plan_the_worker_could_not_carry_out_gives_the_request_back_its_pages(compaction, how, monkeypatch,
                                                                               tiny_model_path):
    """Fail closed: a plan not reported written leaves the request's block table, its span (the old segment for a
    re-compaction) and the pool as before the plan, less only what the step itself allocated; the next plan
    succeeds."""
    _config(monkeypatch)
    h = Harness(tiny_model_path, num_blocks=64)
    request = h.add("a", prompt_tokens=200, max_tokens=150)
    if compaction == "second":
        h.until_plan_for("a")
        h.answer()
    blocks = h.sched._req_blocks("a")
    for _ in range(500):
        before, free_before, span_before = list(blocks), h.pool.get_num_free_blocks(), h.sched.planner.spans.get("a")
        plan = h.schedule()
        if plan is not None and any(p.req_id == "a" for p in plan.plans):
            break
        h.answer()
    planned = next(p for p in plan.plans if p.req_id == "a")
    assert all(blocks[i].is_null for i in range(planned.prev_end_block, planned.end_block))
    h.answer(**UNWRITTEN[how])
    grown = len(blocks) - len(before)  # pages vLLM gave the request for this step's token
    assert [b.block_id for b in blocks[: len(before)]] == [b.block_id for b in before]
    assert h.sched.planner.spans.get("a") is span_before
    assert h.pool.get_num_free_blocks() == free_before - grown
    assert h.sched.compaction_stats.rollbacks == 1
    h.until_plan_for("a")
    h.answer()
    assert h.sched.compactions(request) == (2 if compaction == "second" else 1)
    h.run_to_the_end()
    h.assert_everything_returned()


def test_a_partial_report_settles_only_the_plans_it_lists(monkeypatch, tiny_model_path):
    """Two plans in one step, the report lists one as written: that one frees its source pages, the other is
    undone (its request keeps its source pages and compacts later)."""
    _config(monkeypatch)
    h = Harness(tiny_model_path, num_blocks=64, max_batched=512)  # both prompts in one step: in step ever after
    a = h.add("a", prompt_tokens=200, max_tokens=150)
    b = h.add("b", prompt_tokens=200, max_tokens=150)
    step = h.until_plan_for("a")
    assert sorted(p.req_id for p in step.plans) == ["a", "b"], "the scenario must plan both in one step"
    plan_a, plan_b = sorted(step.plans, key=lambda p: p.req_id)
    blocks_b = h.sched._req_blocks("b")
    free_before = h.pool.get_num_free_blocks()
    h.answer(report=CompactionReport(written=("a",)))
    assert h.sched.compactions(a) == 1 and h.sched.compactions(b) == 0
    assert "b" not in h.sched.planner.spans
    assert [blk.block_id for blk in blocks_b[plan_b.prev_end_block : plan_b.end_block]] == list(plan_b.source_block_ids)
    # a's source pages and b's compact pages are back (the step's own new pages aside: none, decode within a page)
    assert h.pool.get_num_free_blocks() == free_before + len(plan_a.source_block_ids) + len(plan_b.dest_block_ids)
    assert h.sched.compaction_stats.rollbacks == 1
    assert h.sched.compaction_stats.tokens_compacted == plan_a.logical_tokens * BLOCK
    h.until_plan_for("b")
    h.answer()
    assert h.sched.compactions(b) == 1
    h.run_to_the_end()
    h.assert_everything_returned()


@pytest.mark.parametrize("how", ["no report", "failed"])
def test_an_unwritten_plan_under_memory_pressure_recomputes_the_request(how, monkeypatch, tiny_model_path):
    """Under memory pressure the plan's source pages go back to the pool at planning: it cannot be undone. Not
    reported written, its request is preempted (every page back, compaction state gone, the step's token
    discarded), counted as lost, and recomputed from its tokens to the end."""
    config = CompactionConfig(enabled=True, ratio=4, trigger_tokens=10_000, recent_window_tokens=32,
                              protected_initial_tokens=0, memory_pressure=True)
    monkeypatch.setenv(ENV_VAR, config.to_env())
    h = Harness(tiny_model_path, num_blocks=40)
    request = h.add("a", prompt_tokens=360, max_tokens=120)
    step = h.until_plan_for("a")
    plan = next(p for p in step.plans if p.req_id == "a")
    assert plan.sources_released, "the scenario must compact under memory pressure"
    outputs_before = request.num_output_tokens
    h.answer(**({"report": None} if how == "no report" else {"failed": ("a",)}))
    assert request.status == RequestStatus.PREEMPTED and request.num_preemptions == 1
    assert request.num_computed_tokens == 0 and request.num_output_tokens == outputs_before  # token discarded
    assert "a" not in h.sched.planner.spans and h.sched.compactions(request) == 0
    assert h.pool.get_num_free_blocks() == h.free_at_start
    assert h.sched.compaction_stats.lost_plans == 1 and h.sched.compaction_stats.rollbacks == 0
    h.schedule()
    assert "a" in h.output.preempted_req_ids  # the worker drops its compaction state
    cached = h.output.scheduled_cached_reqs
    assert "a" in cached.resumed_req_ids and "a" in cached.all_token_ids  # and trims the discarded token
    h.answer()
    h.run_to_the_end()
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED and request.num_output_tokens == 120
    h.assert_everything_returned()


def test_a_plan_in_flight_holds_its_pages_until_written_and_is_never_planned_twice(monkeypatch, tiny_model_path):
    """The worker carries a plan over several steps (layer chunks) and reports it pending: its source pages stay
    held and the request is not planned again; once written they return. A pending plan the worker then leaves out
    of its report is undone, and the next step tells the worker to drop it."""
    _config(monkeypatch)
    h = Harness(tiny_model_path, num_blocks=64)
    a = h.add("a", prompt_tokens=200, max_tokens=150)
    plan = h.until_plan_for("a").plans[0]
    h.answer(report=CompactionReport(pending=("a",)))
    held_free = h.pool.get_num_free_blocks()
    for _ in range(3):  # steps in flight: no new plan, the source pages held, the request still running
        assert h.schedule() is None
        h.answer(report=CompactionReport(pending=("a",)))
        assert h.sched.compactions(a) == 1 and h.pool.get_num_free_blocks() <= held_free
    assert h.schedule() is None
    h.answer(report=CompactionReport(written=("a",)))
    assert h.pool.get_num_free_blocks() >= held_free + len(plan.source_block_ids) - 1  # one page for new tokens
    assert h.sched.compaction_stats.tokens_compacted == plan.logical_tokens * BLOCK

    # the second compaction stays in flight, then the worker's report leaves it out: undone and cancelled
    second = h.until_plan_for("a").plans[0]
    h.answer(report=CompactionReport(pending=("a",)))
    assert h.schedule() is None
    h.answer(report=CompactionReport())
    assert h.sched.compaction_stats.rollbacks == 1
    assert h.sched.planner.spans["a"].end_block == plan.end_block  # the first segment stands
    blocks = h.sched._req_blocks("a")
    assert [b.block_id for b in blocks[second.prev_end_block : second.end_block]] == list(second.source_block_ids)
    step = h.schedule()  # the worker drops the undone plan before it takes this step's plans (a new one for a)
    assert step is not None and step.cancelled == ("a",)
    h.answer()
    h.run_to_the_end()
    h.assert_everything_returned()
