"""Worker-process state of compaction: compact segments, query reservoirs, counters.

One instance per worker process (`worker_state()`), shared by the model runner (which executes plans) and the
attention backend (which captures queries and reads segments).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_compact.config import CompactionConfig
from vllm_compact.core.dense_cache import DenseKVCache
from vllm_compact.core.stats import WorkerCompactionStats


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
class WorkerCompactionState:
    config: CompactionConfig
    segments: dict[str, CompactSegment] = field(default_factory=dict)
    reservoirs: dict[str, QueryReservoir] = field(default_factory=dict)
    stats: WorkerCompactionStats = field(default_factory=WorkerCompactionStats)
    dense: DenseKVCache = field(default_factory=DenseKVCache)  # CPU fast path, see dense_cache.py
    # Filled by the model runner once the model and KV caches exist.
    num_layers: int = 0
    layer_caches: list[torch.Tensor] = field(default_factory=list)  # per layer index, [nb, Hkv, bs, 2D]
    input_batch: object = None

    def reservoir(self, req_id: str, num_heads: int, head_dim: int, dtype: torch.dtype) -> QueryReservoir:
        res = self.reservoirs.get(req_id)
        if res is None:
            capacity = max(1, min(self.config.recent_window_tokens, self.config.max_reference_queries))
            res = QueryReservoir(self.num_layers, capacity, num_heads, head_dim, dtype)
            self.reservoirs[req_id] = res
            self.stats.reservoir_bytes += res.nbytes
        return res

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            self.segments.pop(req_id, None)
            self.dense.drop(req_id)
            res = self.reservoirs.pop(req_id, None)
            if res is not None:
                self.stats.reservoir_bytes -= res.nbytes


_STATE: WorkerCompactionState | None = None


def init_worker_state(config: CompactionConfig) -> WorkerCompactionState:
    global _STATE
    _STATE = WorkerCompactionState(config=config)
    return _STATE


def worker_state() -> WorkerCompactionState | None:
    return _STATE
