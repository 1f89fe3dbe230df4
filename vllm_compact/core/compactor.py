"""Executes a step's compaction plans on the worker: one batched AM call for every (request, layer, KV head)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from vllm_compact.am import HeadBatch, compact_heads, method_class
from vllm_compact.am.rotary import Rotary
from vllm_compact.core.compact_pages import page_view, read_head, write_layer
from vllm_compact.core.faults import FaultInjector
from vllm_compact.core.plan import CompactionReport, CompactionStep, RequestCompactionPlan
from vllm_compact.core.state import CompactSegment, WorkerCompactionState
from vllm_compact.core.stock_pages import StockBlockLayout

logger = logging.getLogger("vllm_compact.compactor")

# If the requested method raises, the plan is redone with plain eviction, which needs no solve.
FALLBACK_METHODS = ("snapkv", "recent")


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    block_size: int
    scales: tuple[float, ...]  # per layer softmax scale
    rotary: Rotary | None = None  # the model's RoPE on keys (None: position-free scores read rotated keys)


@dataclass
class _HeadInput:
    keys: torch.Tensor     # [T, D]
    values: torch.Tensor   # [T, D]
    bias: torch.Tensor     # [T] fp32 (existing beta of old compact entries, 0 for new tokens)
    positions: torch.Tensor  # [T] int64 the positions the keys were rotated at
    queries: torch.Tensor  # [N, D]
    budget: int
    scale: float


def read_segment_head(
    segment: CompactSegment, pages: torch.Tensor, layer: int, head: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values, beta and key positions of one head of a compact segment from its layer's compact pages."""
    start = int(segment.head_start[layer, head])
    length = int(segment.head_len[layer, head])
    keys, values = read_head(pages, segment.page_ids, start, length)
    entries = slice(start, start + length)
    return keys, values, segment.beta[layer][entries], segment.positions[layer][entries]


class SegmentCompactor:
    def __init__(self, state: WorkerCompactionState, layout: StockBlockLayout, geometry: ModelGeometry) -> None:
        self.state = state
        self.layout = layout
        self.geo = geometry
        self.faults = FaultInjector.from_env()

    # ---- gather -----------------------------------------------------------------------------------------------

    def _head_inputs(self, plan: RequestCompactionPlan) -> list[_HeadInput]:
        geo = self.geo
        old = self.state.segment(plan.req_id) if plan.prev_end_block > plan.start_block else None
        reservoir = self.state.reservoir_of(plan.req_id)
        source = torch.tensor(plan.source_block_ids, dtype=torch.int64)
        new_positions = torch.arange(plan.prev_end_block * geo.block_size, plan.end_block * geo.block_size)
        group = geo.num_q_heads // geo.num_kv_heads
        inputs = []
        for layer in range(geo.num_layers):
            cache = self.state.layer_caches[layer]
            new_keys, new_values = self.layout.read(cache, source)  # [Hkv, n*bs, D]
            if reservoir is not None:
                q = reservoir.queries(layer)  # [n, Hq, D]
                q = q.view(q.shape[0], geo.num_kv_heads, group, geo.head_dim).permute(1, 0, 2, 3)
                q = q.reshape(geo.num_kv_heads, -1, geo.head_dim)
            else:
                q = new_keys.new_zeros(geo.num_kv_heads, 0, geo.head_dim)
            pages = page_view(cache)
            for head in range(geo.num_kv_heads):
                keys, values, positions = new_keys[head], new_values[head], new_positions
                bias = torch.zeros(keys.shape[0], dtype=torch.float32)
                if old is not None:
                    old_k, old_v, old_b, old_pos = read_segment_head(old, pages, layer, head)
                    keys, values = torch.cat([old_k, keys]), torch.cat([old_v, values])
                    bias, positions = torch.cat([old_b, bias]), torch.cat([old_pos, positions])
                inputs.append(_HeadInput(keys, values, bias, positions, q[head], plan.head_budgets[layer][head],
                                         geo.scales[layer]))
        return inputs

    def _batch(self, inputs: list[_HeadInput]) -> tuple[HeadBatch, torch.Tensor]:
        """The padded batch and [H, T] int64 key positions (0 at padding)."""
        num_heads = len(inputs)
        max_t = max(x.keys.shape[0] for x in inputs)
        max_n = max(1, max(x.queries.shape[0] for x in inputs))
        dim = inputs[0].keys.shape[1]
        dtype = inputs[0].keys.dtype
        keys = torch.zeros(num_heads, max_t, dim, dtype=dtype)
        values = torch.zeros_like(keys)
        bias = torch.zeros(num_heads, max_t, dtype=torch.float32)
        queries = torch.zeros(num_heads, max_n, dim, dtype=dtype)
        positions = torch.zeros(num_heads, max_t, dtype=torch.int64)
        for i, x in enumerate(inputs):
            t, n = x.keys.shape[0], x.queries.shape[0]
            keys[i, :t], values[i, :t], bias[i, :t], positions[i, :t] = x.keys, x.values, x.bias, x.positions
            queries[i, :n] = x.queries
        has_bias = any(bool(x.bias.any()) for x in inputs)
        rotary = self.geo.rotary
        content_keys = None if rotary is None else rotary.unrotate(keys, positions).to(dtype)
        batch = HeadBatch(
            keys=keys,
            values=values,
            queries=queries,
            scale=torch.tensor([x.scale for x in inputs], dtype=torch.float32),
            budget=torch.tensor([x.budget for x in inputs], dtype=torch.int64),
            key_len=torch.tensor([x.keys.shape[0] for x in inputs], dtype=torch.int64),
            query_len=torch.tensor([x.queries.shape[0] for x in inputs], dtype=torch.int64),
            key_bias=bias if has_bias else None,
            content_keys=content_keys,
        )
        return batch, positions

    # ---- solve ------------------------------------------------------------------------------------------------

    def _solve(self, batch: HeadBatch, method: str):
        """The method's result, else the first fallback that succeeds with finite numbers (counted as failures)."""
        methods = (method,) + tuple(m for m in FALLBACK_METHODS if m != method)
        for i, name in enumerate(methods):
            cls = method_class(name)
            if cls.needs_queries and int(batch.query_len.min()) == 0:
                continue  # no reference queries: only position-based eviction applies
            try:
                config = self.state.config
                result = self.faults.solve(compact_heads, batch, name, **config.method_options(name))
                if not _finite(result):
                    raise FloatingPointError(f"{name} returned non-finite entries")
            except Exception:  # noqa: BLE001 - contained: the request goes on with a cheaper method
                logger.exception("vllm-compact: compaction with %s failed; falling back", name)
                continue
            if i > 0:
                self.state.stats.failures += 1
            return result
        raise RuntimeError("every compaction method failed")

    # ---- write ------------------------------------------------------------------------------------------------

    def _write(self, plan: RequestCompactionPlan, result, positions: torch.Tensor, first_head: int,
               faults: bool = True) -> CompactSegment:
        geo = self.geo
        dest = torch.tensor(plan.dest_block_ids, dtype=torch.int32)
        head_start = torch.zeros(geo.num_layers, geo.num_kv_heads, dtype=torch.int32)
        head_len = torch.zeros_like(head_start)
        betas, kept_positions = [], []
        for layer in range(geo.num_layers):
            rows = range(first_head + layer * geo.num_kv_heads, first_head + (layer + 1) * geo.num_kv_heads)
            lengths = [int(result.length[r]) for r in rows]
            head_start[layer], head_len[layer] = write_layer(
                page_view(self.state.layer_caches[layer]), dest,
                [result.keys[r, :n] for r, n in zip(rows, lengths)],
                [result.values[r, :n] for r, n in zip(rows, lengths)],
            )
            betas.append(torch.cat([result.beta[r, :n].float() for r, n in zip(rows, lengths)]).contiguous())
            kept_positions.append(torch.cat([positions[r, result.indices[r, :n]] for r, n in zip(rows, lengths)]))
            if faults and layer == 0:
                self.faults.check("write")  # a failure halfway: the pages are private to the plan
        return CompactSegment(plan.start_block, plan.end_block, dest, head_start, head_len, betas, kept_positions)

    def execute(self, step: CompactionStep) -> CompactionReport:
        """Every plan ends with its segment written (listed in `written`), or listed as failed with nothing changed
        (the scheduler still holds its source pages and gives them back to the request). A plan whose source pages
        were released at planning cannot be undone: its last resort is the newest keys of the span, a copy that
        needs no solve; if even that fails, it is reported failed and the scheduler recomputes the request."""
        by_method: dict[str, list[RequestCompactionPlan]] = {}
        for plan in step.plans:
            reservoir = self.state.reservoir_of(plan.req_id)
            has_queries = reservoir is not None and reservoir.size > 0
            method = plan.method if has_queries or not method_class(plan.method).needs_queries else "recent"
            by_method.setdefault(method, []).append(plan)
        failed: list[str] = []
        for method, plans in by_method.items():
            try:
                self._execute_batch(method, plans)
            except Exception:  # noqa: BLE001 - a step with several requests: retry each alone
                logger.exception("vllm-compact: batched compaction with %s failed; retrying per request", method)
                failed.extend(plan.req_id for plan in plans if not self._execute_alone(method, plan))
        self.state.stats.faults_injected = self.faults.injected
        written = tuple(plan.req_id for plan in step.plans if plan.req_id not in failed)
        return CompactionReport(written=written, failed=tuple(failed))

    def _execute_alone(self, method: str, plan: RequestCompactionPlan) -> bool:
        try:
            self._execute_batch(method, [plan])
            return True
        except Exception:  # noqa: BLE001 - contained: see execute()
            self.state.stats.failures += 1
            if not plan.sources_released:
                logger.exception("vllm-compact: compaction of %s failed; it stays uncompacted", plan.req_id)
                return False
            logger.exception("vllm-compact: compaction of %s failed; keeping its newest keys", plan.req_id)
        try:
            self._execute_batch("recent", [plan], faults=False)
            return True
        except Exception:  # noqa: BLE001 - reported failed: the scheduler recomputes the request's KV
            logger.exception("vllm-compact: copying the newest keys of %s failed too", plan.req_id)
            return False

    def _execute_batch(self, method: str, plans: list[RequestCompactionPlan], faults: bool = True) -> None:
        """Every (request, layer, KV head) of these plans in one call of the AM core; segments are installed only
        once every plan's pages are written."""
        started = time.perf_counter()
        inputs: list[_HeadInput] = []
        for plan in plans:
            if faults:
                self.faults.check("gather")
            inputs.extend(self._head_inputs(plan))
        batch, positions = self._batch(inputs)
        result = self._solve(batch, method) if faults else compact_heads(batch, method)
        heads_per_plan = self.geo.num_layers * self.geo.num_kv_heads
        segments = [self._write(plan, result, positions, i * heads_per_plan, faults) for i, plan in enumerate(plans)]
        for plan, segment in zip(plans, segments):
            self.state.record(plan.req_id, captures=False).segment = segment
        self.state.stats.compactions += len(plans)
        self.state.stats.heads_fell_back += int(result.fell_back.sum())
        self.state.stats.seconds.append(time.perf_counter() - started)


def _finite(result) -> bool:
    valid = result.indices >= 0
    return bool(torch.isfinite(result.keys[valid]).all() and torch.isfinite(result.values[valid]).all()
                and torch.isfinite(result.beta[valid]).all())
