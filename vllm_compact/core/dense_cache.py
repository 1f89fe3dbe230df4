"""Dense per-request copies of a compacted request's KV, so the CPU path stops re-gathering pages every step.

The KV pages stay the source of truth (they are what the pool counts and frees). A compacted request's attention on
CPU used to gather its compact segment and its uncompacted tail out of those pages at every layer of every step;
that gather, not the math, dominated decode. Here each request keeps, per layer, one fp32 buffer holding
- its compact segment's entries (gathered once per segment: a segment only changes at a compaction), then
- its physical tail (protected head pages + pages after the segment), read from the pages once after a compaction
  and then grown by the keys/values each step writes (the same tensors the stock cache writer stored),
with a bias row (beta for entries, -inf for per-head padding, 0 for the tail), so one decode token is a single
softmax over the buffer. Anything that does not line up (a new segment, a length that does not match) rebuilds
from the pages: a stale copy can cost time but never change results. The copies cost about twice the request's
physical KV in fp32; they are counted (`nbytes`) and dropped with the request's compaction state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from vllm_compact.core.compact_pages import SegmentEntries, gather_layer

if TYPE_CHECKING:  # state.py owns the dense cache; import its types only for annotations
    from vllm_compact.core.state import CompactSegment


@dataclass
class LayerKV:
    """[compact entries ; tail] of one layer: keys/values [Hkv, capacity, D], bias [Hkv, capacity] (fp32)."""

    keys: Tensor
    values: Tensor
    bias: Tensor
    num_entries: int  # E: entry columns (the longest head; shorter heads are padded with bias -inf)
    tail_len: int = -1  # valid tail tokens after the entries; -1 until the tail is first read

    @property
    def length(self) -> int:
        return self.num_entries + max(self.tail_len, 0)

    def entries(self) -> SegmentEntries:
        e = self.num_entries
        return SegmentEntries(self.keys[:, :e], self.values[:, :e], self.bias[:, :e])

    def tail(self) -> tuple[Tensor, Tensor]:
        return self.keys[:, self.num_entries : self.length], self.values[:, self.num_entries : self.length]

    def buffers(self) -> tuple[Tensor, Tensor, Tensor]:
        """keys, values [Hkv, length, D] and bias [Hkv, length]: what kernels/request_attention.py reads."""
        n = self.length
        return self.keys[:, :n], self.values[:, :n], self.bias[:, :n]

    def set_tail(self, keys: Tensor, values: Tensor) -> None:
        self.tail_len = 0
        self.append(keys, values)

    def append(self, keys: Tensor, values: Tensor) -> None:
        """keys/values [Hkv, n, D]; capacity doubles, so a growing tail costs amortised O(1) copies per token."""
        start, end = self.length, self.length + keys.shape[1]
        if end > self.keys.shape[1]:
            capacity = max(end, 2 * self.keys.shape[1], self.num_entries + 64)
            self.keys, self.values = self._moved(self.keys, capacity), self._moved(self.values, capacity)
            bias = self.bias.new_zeros(self.bias.shape[0], capacity)
            bias[:, :start] = self.bias[:, :start]
            self.bias = bias
        self.keys[:, start:end] = keys
        self.values[:, start:end] = values
        self.bias[:, start:end] = 0.0
        self.tail_len = end - self.num_entries

    def _moved(self, buffer: Tensor, capacity: int) -> Tensor:
        grown = buffer.new_empty(buffer.shape[0], capacity, buffer.shape[2])
        grown[:, : self.length] = buffer[:, : self.length]
        return grown

    @property
    def nbytes(self) -> int:
        return (2 * self.keys.numel() + self.bias.numel()) * 4


@dataclass
class RequestDenseKV:
    """One compacted request's per-layer buffers, for the segment they were built from."""

    segment: CompactSegment
    layers: dict[int, LayerKV] = field(default_factory=dict)

    def layer(
        self, layer: int, pages: Tensor, tail_len: int, new_keys: Tensor | None, new_values: Tensor | None,
        read_pages: Callable[[], tuple[Tensor, Tensor]],
    ) -> LayerKV:
        """The layer's buffer with its tail at `tail_len` tokens (this step's tokens last).

        new_keys/new_values [n, Hkv, D] are this step's tokens as the cache writer received them; they are appended
        when the copy is exactly n tokens behind, otherwise (or when they are None) the tail is read from the pages.
        """
        kv = self.layers.get(layer)
        if kv is None:
            seg = self.segment
            entries = gather_layer(pages, seg.beta[layer], seg.page_ids, seg.head_start[layer], seg.head_len[layer])
            kv = LayerKV(entries.keys, entries.values, entries.bias, num_entries=entries.bias.shape[1])
            self.layers[layer] = kv
        if kv.tail_len >= 0 and new_keys is not None and kv.tail_len + new_keys.shape[0] == tail_len:
            kv.append(new_keys.transpose(0, 1).float(), new_values.transpose(0, 1).float())
        else:
            keys, values = read_pages()
            kv.set_tail(keys[:, :tail_len].float(), values[:, :tail_len].float())
        return kv

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self.layers.values())


class DenseKVCache:
    """The worker's dense copies, keyed by request; a request's copy is dropped with its compaction state."""

    def __init__(self) -> None:
        self._requests: dict[str, RequestDenseKV] = {}

    def for_request(self, req_id: str, segment: CompactSegment) -> RequestDenseKV:
        dense = self._requests.get(req_id)
        if dense is None or dense.segment is not segment:
            dense = RequestDenseKV(segment)
            self._requests[req_id] = dense
        return dense

    def drop(self, req_id: str) -> None:
        self._requests.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self._requests.values())
