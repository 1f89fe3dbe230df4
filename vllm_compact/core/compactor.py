"""Executes a step's compaction plans on the worker: batched AM calls over (request, layer, KV head), in plan order,
each within the step's workspace (core/workspace.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from vllm_compact.am import CompactedHeads, HeadBatch, compact_heads, method_class
from vllm_compact.am.rotary import Rotary
from vllm_compact.core.compact_pages import page_view, read_head, write_layer
from vllm_compact.core.faults import FaultInjector
from vllm_compact.core.plan import CompactionReport, CompactionStep, RequestCompactionPlan
from vllm_compact.core.state import CompactSegment, WorkerCompactionState
from vllm_compact.core.stock_pages import StockBlockLayout
from vllm_compact.core.workspace import SOLVE_FIXED_BYTES, MiB, head_solve_bytes

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

    @property
    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.bias, self.positions, self.queries)
        return sum(t.numel() * t.element_size() for t in tensors)


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
        self.in_flight: dict[str, _PlanInProgress] = {}  # req_id -> plan being carried out, oldest first

    # ---- gather -----------------------------------------------------------------------------------------------

    def _head_inputs(self, plan: RequestCompactionPlan, layers: range) -> list[_HeadInput]:
        geo = self.geo
        old = self.state.segment(plan.req_id) if plan.prev_end_block > plan.start_block else None
        reservoir = self.state.reservoir_of(plan.req_id)
        source = torch.tensor(plan.source_block_ids, dtype=torch.int64)
        new_positions = torch.arange(plan.prev_end_block * geo.block_size, plan.end_block * geo.block_size)
        group = geo.num_q_heads // geo.num_kv_heads
        inputs = []
        for layer in layers:
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

    def _solve(self, batch: HeadBatch, method: str) -> tuple[CompactedHeads, str]:
        """The method's result and name, else the first fallback that succeeds with finite numbers (counted as
        failures)."""
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
            return result, name
        raise RuntimeError("every compaction method failed")

    # ---- write ------------------------------------------------------------------------------------------------

    def _write(self, work: _PlanInProgress, layers: range, result, positions: torch.Tensor, first_head: int,
               faults: bool = True) -> None:
        """Pack layers `layers` of the plan's result into its destination pages; the segment is installed once
        every layer is written (`_finish`)."""
        geo = self.geo
        dest = torch.tensor(work.plan.dest_block_ids, dtype=torch.int32)
        for i, layer in enumerate(layers):
            rows = range(first_head + i * geo.num_kv_heads, first_head + (i + 1) * geo.num_kv_heads)
            lengths = [int(result.length[r]) for r in rows]
            work.head_start[layer], work.head_len[layer] = write_layer(
                page_view(self.state.layer_caches[layer]), dest,
                [result.keys[r, :n] for r, n in zip(rows, lengths)],
                [result.values[r, :n] for r, n in zip(rows, lengths)],
            )
            work.betas[layer] = torch.cat([result.beta[r, :n].float() for r, n in zip(rows, lengths)]).contiguous()
            work.positions[layer] = torch.cat([positions[r, result.indices[r, :n]] for r, n in zip(rows, lengths)])
            if faults and i == 0:
                self.faults.check("write")  # a failure halfway: the pages are private to the plan

    # ---- execute ----------------------------------------------------------------------------------------------

    def execute(self, step: CompactionStep, layers_per_step: int = 0) -> CompactionReport:
        """Carry this step's share of the plans in flight; every plan ends with its segment written (`written`), or
        listed as failed with nothing changed (the scheduler still holds its source pages and gives them back).

        A plan runs `layers_per_step` layers per step at most, all plans together (0: whole plans), oldest plan
        first; the others stay `pending`, and the request attends over its pages as before until its segment is
        installed. A plan whose source pages were released at planning (memory pressure) runs whole now: this
        step may reuse those pages. It cannot be undone: its last resort is the newest keys of the span, a copy
        that needs no solve; if even that fails, it is reported failed and the scheduler recomputes the request.
        """
        for req_id in step.cancelled:
            self.in_flight.pop(req_id, None)
        for plan in step.plans:
            reservoir = self.state.reservoir_of(plan.req_id)
            has_queries = reservoir is not None and reservoir.size > 0
            method = plan.method if has_queries or not method_class(plan.method).needs_queries else "recent"
            self.in_flight[plan.req_id] = _PlanInProgress.start(plan, method, self.geo.num_layers)
        failed: list[str] = []
        chunks: list[_Chunk] = []
        for group in self._solve_groups(self._chunks(layers_per_step)):
            group = [(work, layers) for work, layers in group if work.plan.req_id not in failed]
            read = self._read_all(group, failed)
            if not read:
                continue
            chunks.extend(read)
            method = read[0].work.method
            try:
                self._solve_and_write(method, read)
            except Exception:  # noqa: BLE001 - a group with several requests: retry each alone
                logger.exception("vllm-compact: batched compaction with %s failed; retrying per request", method)
                failed.extend(chunk.work.plan.req_id for chunk in read if not self._execute_alone(chunk))
        written = []
        for chunk in chunks:  # a plan may have a chunk in several groups: finished once
            req_id = chunk.work.plan.req_id
            if req_id not in failed and req_id not in written and chunk.work.done:
                self._finish(chunk.work)
                written.append(req_id)
        for req_id in failed:
            self.in_flight.pop(req_id, None)
        self.state.stats.faults_injected = self.faults.injected
        return CompactionReport(written=tuple(written), failed=tuple(failed), pending=tuple(self.in_flight))

    def forget(self, req_ids) -> None:
        """The requests released their pages: their plans in flight are dropped."""
        for req_id in req_ids:
            self.in_flight.pop(req_id, None)

    def _chunks(self, layers_per_step: int) -> list[tuple[_PlanInProgress, range]]:
        """(plan, layers) to run this step: released plans whole, then the oldest plans up to the layer budget."""
        chunks = []
        budget = layers_per_step if layers_per_step > 0 else None
        for work in self.in_flight.values():
            remaining = self.geo.num_layers - work.next_layer
            if work.plan.sources_released or budget is None:
                take = remaining
            else:
                take = min(remaining, budget)
                budget -= take
            if take > 0:
                chunks.append((work, range(work.next_layer, work.next_layer + take)))
        return chunks

    def _solve_groups(self, chunks: list[tuple[_PlanInProgress, range]]) -> list[list[tuple[_PlanInProgress, range]]]:
        """The step's (plan, layers) in plan order, cut into solves of one method whose estimated memory stays within
        `workspace_mib` (a layer is the smallest piece: one layer alone may exceed it).

        Order is what keeps every plan's inputs its own. Under memory pressure a plan's source pages (and a
        re-compacted segment's old pages) go back to the pool at planning, so a plan planned later may have them as
        destination pages; but a plan's destination was allocated before any later plan's sources were freed, so
        it is never a later plan's source. Solving in plan order, each group read whole before it writes, every
        page is read before anything can overwrite it.
        """
        limit = self.state.config.workspace_mib * MiB
        groups: list[list[tuple[_PlanInProgress, range]]] = []
        used = limit + 1  # the first piece opens a group
        for work, layers in chunks:
            for layer in layers:
                nbytes = sum(self._head_bytes(work, layer))
                group = groups[-1] if groups else None
                if group is None or group[0][0].method != work.method or used + nbytes > limit:
                    groups.append([(work, range(layer, layer + 1))])
                    used = SOLVE_FIXED_BYTES + nbytes
                    continue
                last, last_layers = group[-1]
                if last is work and last_layers.stop == layer:
                    group[-1] = (work, range(last_layers.start, layer + 1))
                else:
                    group.append((work, range(layer, layer + 1)))
                used += nbytes
        return groups

    def _head_bytes(self, work: _PlanInProgress, layer: int) -> list[int]:
        """workspace.head_solve_bytes of each KV head of one layer of a plan, from the plan alone (nothing read)."""
        geo, plan = self.geo, work.plan
        old = self.state.segment(plan.req_id) if plan.prev_end_block > plan.start_block else None
        reservoir = self.state.reservoir_of(plan.req_id)
        queries = (reservoir.size if reservoir is not None else 0) * (geo.num_q_heads // geo.num_kv_heads)
        new_keys = (plan.end_block - plan.prev_end_block) * geo.block_size
        dtype_bytes = self.state.layer_caches[layer].element_size()
        return [head_solve_bytes(new_keys + (int(old.head_len[layer, head]) if old is not None else 0), queries,
                                 plan.head_budgets[layer][head], geo.head_dim, dtype_bytes)
                for head in range(geo.num_kv_heads)]

    def _read_all(self, chunks: list[tuple[_PlanInProgress, range]], failed: list[str]) -> list[_Chunk]:
        """Every chunk's inputs of one solve group, read before the group writes a page (see _solve_groups). A plan
        whose pages cannot be read is added to `failed`, unless its pages were released: then its last resort reads
        them again, unfaulted."""
        read = []
        for work, layers in chunks:
            started = time.perf_counter()
            try:
                self.faults.check("gather")
                inputs = self._head_inputs(work.plan, layers)
            except Exception:  # noqa: BLE001 - contained: see execute()
                inputs = self._read_after_failure(work, layers)
            if inputs is None:
                failed.append(work.plan.req_id)
                continue
            work.seconds += time.perf_counter() - started
            read.append(_Chunk(work, layers, inputs))
        self.state.stats.note_workspace(sum(x.nbytes for chunk in read for x in chunk.inputs))
        return read

    def _read_after_failure(self, work: _PlanInProgress, layers: range) -> list[_HeadInput] | None:
        self.state.stats.failures += 1
        if not work.plan.sources_released:
            logger.exception("vllm-compact: reading the pages of %s failed; it stays uncompacted", work.plan.req_id)
            return None
        logger.exception("vllm-compact: reading the pages of %s failed; keeping its newest keys", work.plan.req_id)
        work.method = "recent"
        try:
            return self._head_inputs(work.plan, layers)
        except Exception:  # noqa: BLE001 - reported failed: the scheduler recomputes the request's KV
            logger.exception("vllm-compact: reading the pages of %s failed again", work.plan.req_id)
            return None

    def _execute_alone(self, chunk: _Chunk) -> bool:
        """One chunk after its batch failed, from the inputs read at the start of the step."""
        plan = chunk.work.plan
        try:
            self._solve_and_write(chunk.work.method, [chunk])
            return True
        except Exception:  # noqa: BLE001 - contained: see execute()
            self.state.stats.failures += 1
            if not plan.sources_released:
                logger.exception("vllm-compact: compaction of %s failed; it stays uncompacted", plan.req_id)
                return False
            logger.exception("vllm-compact: compaction of %s failed; keeping its newest keys", plan.req_id)
        try:
            chunk.work.method = "recent"
            self._solve_and_write("recent", [chunk], faults=False)
            return True
        except Exception:  # noqa: BLE001 - reported failed: the scheduler recomputes the request's KV
            logger.exception("vllm-compact: copying the newest keys of %s failed too", plan.req_id)
            return False

    def _solve_and_write(self, method: str, chunks: list[_Chunk], faults: bool = True) -> None:
        """Every (request, layer, KV head) of these chunks in one call of the AM core, from the inputs read at the
        start of the step (`_read_all`), then written to the chunks' destination pages."""
        started = time.perf_counter()
        batch, positions = self._batch([x for chunk in chunks for x in chunk.inputs])
        self.state.stats.note_workspace(_batch_bytes(batch))
        result, solved_by = self._solve(batch, method) if faults else (compact_heads(batch, method), method)
        first_head = 0
        for chunk in chunks:
            self._write(chunk.work, chunk.layers, result, positions, first_head, faults)
            first_head += len(chunk.layers) * self.geo.num_kv_heads
        elapsed = time.perf_counter() - started
        total_layers = sum(len(chunk.layers) for chunk in chunks)
        for chunk in chunks:
            chunk.work.next_layer = chunk.layers.stop
            chunk.work.seconds += elapsed * len(chunk.layers) / total_layers
        self.state.stats.count_heads(result.fell_back, fitted=method_class(solved_by).fits)

    def _finish(self, work: _PlanInProgress) -> None:
        """Every layer is written: the segment replaces the request's view of its span."""
        plan = work.plan
        segment = CompactSegment(plan.start_block, plan.end_block, torch.tensor(plan.dest_block_ids, dtype=torch.int32),
                                 work.head_start, work.head_len, work.betas, work.positions)
        self.state.install_segment(plan.req_id, segment)
        self.in_flight.pop(plan.req_id, None)
        self.state.stats.compactions += 1
        self.state.stats.seconds.append(work.seconds)


@dataclass
class _Chunk:
    """Layers `layers` of a plan in flight, with what this step read of its pages for them."""

    work: _PlanInProgress
    layers: range
    inputs: list[_HeadInput]


@dataclass
class _PlanInProgress:
    """A plan the worker is carrying out, layer chunk by layer chunk; the segment's tables fill as layers are
    written."""

    plan: RequestCompactionPlan
    method: str
    head_start: torch.Tensor  # [num_layers, Hkv] int32
    head_len: torch.Tensor
    betas: list[torch.Tensor]
    positions: list[torch.Tensor]
    next_layer: int = 0
    seconds: float = 0.0

    @classmethod
    def start(cls, plan: RequestCompactionPlan, method: str, num_layers: int) -> _PlanInProgress:
        num_kv_heads = len(plan.head_budgets[0])
        head_start = torch.zeros(num_layers, num_kv_heads, dtype=torch.int32)
        empty = [torch.zeros(0)] * num_layers
        return cls(plan, method, head_start, torch.zeros_like(head_start), list(empty), list(empty))

    @property
    def done(self) -> bool:
        return self.next_layer >= len(self.betas)


def _batch_bytes(batch: HeadBatch) -> int:
    tensors = [batch.keys, batch.values, batch.queries, batch.content_keys, batch.key_bias]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _finite(result) -> bool:
    valid = result.indices >= 0
    return bool(torch.isfinite(result.keys[valid]).all() and torch.isfinite(result.values[valid]).all()
                and torch.isfinite(result.beta[valid]).all())
