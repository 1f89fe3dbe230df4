"""Worker-process state of compaction: one record per request (compact segment, query reservoir), counters.

One instance per worker process (`worker_state()`), shared by the model runner (which executes plans) and the
attention backend (which captures queries and reads segments). A compacted request's KV lives only in its pool
pages: attention reads them in place each step, so what a request holds outside the pool is its reservoir (only
while it can still compact) and its segment's per-entry metadata (beta, positions, where each entry sits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_compact.config import CompactionConfig
from vllm_compact.core.planner import may_compact_again
from vllm_compact.core.request_overrides import request_config
from vllm_compact.core.stats import WorkerCompactionStats

from vllm_compact.core.request_kv import SegmentDecodeIndex, segment_decode_index


@dataclass
class CompactSegment:
    """One request's compact segment: logical blocks [start_block, end_block) live in `page_ids`.

    Per layer, the entries of all KV heads are packed back to back in the pages' flattened lanes: head h of layer l
    occupies [head_start[l, h], head_start[l, h] + head_len[l, h]); beta[l] holds one fp32 bias per entry and
    positions[l] the position each entry's key was rotated at (a re-compaction undoes RoPE with it).
    """

    start_block: int
    end_block: int
    page_ids: torch.Tensor    # [P] int32
    head_start: torch.Tensor  # [num_layers, Hkv] int32
    head_len: torch.Tensor    # [num_layers, Hkv] int32
    beta: list[torch.Tensor]  # per layer, [entries of that layer] fp32
    positions: list[torch.Tensor]  # per layer, [entries of that layer] int64

    @property
    def nbytes(self) -> int:
        """Its metadata outside the pool (the entries themselves live in its pool pages)."""
        tensors = [self.page_ids, self.head_start, self.head_len, *self.beta, *self.positions]
        return sum(t.numel() * t.element_size() for t in tensors)

    def kept_positions(self) -> list[list[list[int]]]:
        """[layer][head] the positions of the keys each head kept, in entry order."""
        return [[self.positions[layer][int(start) : int(start) + int(length)].tolist()
                 for start, length in zip(self.head_start[layer], self.head_len[layer])]
                for layer in range(len(self.positions))]


class QueryReservoir:
    """The queries of a request's most recent `capacity` tokens, per layer (a ring buffer).

    These tokens come after every page that can be compacted (the protected recent window), so they look at the
    span the way future tokens will.
    """

    def __init__(self, num_layers: int, capacity: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.buffer = torch.zeros(num_layers, capacity, num_heads, head_dim, dtype=dtype)
        self.count = [0] * num_layers  # tokens ever appended, per layer

    @property
    def capacity(self) -> int:
        return self.buffer.shape[1]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @property
    def size(self) -> int:
        """Queries held (of the layer with the fewest: every layer sees the same tokens)."""
        return min(min(self.count), self.capacity)

    def append(self, layer: int, queries: torch.Tensor) -> None:
        queries = queries[-self.capacity :]
        n = queries.shape[0]
        pos = self.count[layer] % self.capacity
        first = min(n, self.capacity - pos)
        self.buffer[layer, pos : pos + first] = queries[:first]
        if first < n:
            self.buffer[layer, : n - first] = queries[first:]
        self.count[layer] += n

    def queries(self, layer: int) -> torch.Tensor:
        """[n, Hq, D], n = min(count, capacity); order is irrelevant to the fit."""
        return self.buffer[layer, : min(self.count[layer], self.capacity)]


@dataclass
class WorkerRequest:
    """The worker's compaction state of one request (one record per request)."""

    captures: bool  # its queries are captured: it may still compact and its method reads reference queries
    segment: CompactSegment | None = None
    reservoir: QueryReservoir | None = None
    decode_index: SegmentDecodeIndex | None = None  # where its segment's entries sit (made at its first decode)

    @property
    def nbytes(self) -> int:
        """Memory it holds outside the KV pool: the reservoir and the segment's per-entry metadata."""
        held = self.reservoir.nbytes if self.reservoir is not None else 0
        if self.segment is not None:
            held += self.segment.nbytes
        if self.decode_index is not None:
            held += self.decode_index.nbytes
        return held


@dataclass
class WorkerCompactionState:
    config: CompactionConfig
    requests: dict[str, WorkerRequest] = field(default_factory=dict)
    stats: WorkerCompactionStats = field(default_factory=WorkerCompactionStats)
    # Filled by the model runner once the model and KV caches exist.
    num_layers: int = 0
    layer_caches: list[torch.Tensor] = field(default_factory=list)  # per layer index, [nb, Hkv, bs, 2D]
    block_size: int = 0
    input_batch: object = None
    runner_requests: dict | None = None  # the model runner's per-request state (prompt, sampling params)

    def segment(self, req_id: str) -> CompactSegment | None:
        record = self.requests.get(req_id)
        return None if record is None else record.segment

    def reservoir_of(self, req_id: str) -> QueryReservoir | None:
        record = self.requests.get(req_id)
        return None if record is None else record.reservoir

    def record(self, req_id: str) -> WorkerRequest:
        """The request's record, made on first sight with its capture decision."""
        record = self.requests.get(req_id)
        if record is None:
            record = self.requests[req_id] = WorkerRequest(captures=self.may_compact(req_id))
        return record

    def may_compact(self, req_id: str, compacted_until: int = 0) -> bool:
        """Whether the request may still be compacted by length past `compacted_until` tokens (planner.
        may_compact_again on its own settings, prompt and max tokens, read from the model runner's request)."""
        cached = self.runner_requests.get(req_id) if self.runner_requests is not None else None
        params = getattr(cached, "sampling_params", None)
        if cached is None or params is None or cached.prompt_token_ids is None:
            return False
        try:
            cfg = request_config(self.config, params.extra_args)
        except Exception:  # noqa: BLE001 - refused at admission; the scheduler serves it without compaction
            return False
        final_tokens = len(cached.prompt_token_ids) + (params.max_tokens or 0)
        return may_compact_again(cfg, final_tokens, self.block_size, compacted_until)

    def reservoir(self, record: WorkerRequest, num_heads: int, head_dim: int, dtype: torch.dtype) -> QueryReservoir:
        if record.reservoir is None:
            capacity = self.config.reference_queries
            record.reservoir = QueryReservoir(self.num_layers, capacity, num_heads, head_dim, dtype)
            self._note_outside_pool()
        return record.reservoir

    def install_segment(self, req_id: str, segment: CompactSegment) -> None:
        """The request's new compact segment; its reservoir goes if it cannot compact again."""
        record = self.record(req_id)
        record.segment, record.decode_index = segment, None
        if record.captures and not self.may_compact(req_id, segment.end_block * self.block_size):
            record.captures, record.reservoir = False, None
        self._note_outside_pool()

    def decode_index(self, record: WorkerRequest) -> SegmentDecodeIndex:
        """Where the record's segment entries sit in the pool: made once per segment, counted outside the pool."""
        if record.decode_index is None:
            cache = self.layer_caches[0]  # [nb, Hkv, bs, 2D]: a page holds Hkv * bs entries
            record.decode_index = segment_decode_index(record.segment, cache.shape[1] * cache.shape[2])
            self._note_outside_pool()
        return record.decode_index

    def _note_outside_pool(self) -> None:
        """Outside-pool memory only grows where a reservoir or a segment is made: the peak is taken there."""
        self.stats.outside_pool_bytes_peak = max(self.stats.outside_pool_bytes_peak, self.outside_pool_bytes)

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            self.requests.pop(req_id, None)

    @property
    def reservoir_bytes(self) -> int:
        return sum(r.reservoir.nbytes for r in self.requests.values() if r.reservoir is not None)

    @property
    def segment_bytes(self) -> int:
        """Compact segments' metadata outside the pool, their decode index included."""
        return sum(r.nbytes - (r.reservoir.nbytes if r.reservoir is not None else 0) for r in self.requests.values())

    @property
    def outside_pool_bytes(self) -> int:
        """Everything compaction holds outside the KV pool now (per-step transients excluded: see stats)."""
        return sum(r.nbytes for r in self.requests.values())

    def compacted_memory(self) -> tuple[int, int, float]:
        """(compacted requests, the pool bytes they hold, the largest ratio of one's outside-pool bytes to its pool
        bytes). A request's pool pages are its compact pages plus its tail blocks (head pages and pages after the
        segment), from the model runner's block list."""
        page_bytes = sum(cache[0].numel() * cache.element_size() for cache in self.layer_caches)
        count, pool_bytes, ratio = 0, 0, 0.0
        for req_id, record in self.requests.items():
            segment = record.segment
            cached = self.runner_requests.get(req_id) if self.runner_requests is not None else None
            if segment is None or cached is None:
                continue
            blocks = len(cached.block_ids[0]) - (segment.end_block - segment.start_block) + len(segment.page_ids)
            held = blocks * page_bytes
            count, pool_bytes = count + 1, pool_bytes + held
            ratio = max(ratio, record.nbytes / held if held else 0.0)
        return count, pool_bytes, ratio


_STATE: WorkerCompactionState | None = None


def init_worker_state(config: CompactionConfig) -> WorkerCompactionState:
    global _STATE
    _STATE = WorkerCompactionState(config=config)
    return _STATE


def worker_state() -> WorkerCompactionState | None:
    return _STATE
