"""Dense per-request copies of a compacted request's KV, so the CPU path stops re-gathering pages every step.

The KV pages stay the source of truth (they are what the pool counts and frees). A compacted request's attention on
CPU used to gather its compact segment and its uncompacted tail out of those pages at every layer of every step;
that gather, not the math, dominated decode. Here each request keeps, per layer:
- its compact segment's entries, gathered once per segment (the segment only changes at a compaction);
- its physical tail (protected head pages + pages after the segment), read from the pages once after a compaction
  and then grown by the keys/values each step writes (the same tensors the stock cache writer stored).
Anything that does not line up (a new segment, a length that does not match) rebuilds from the pages, so a stale
copy can cost time but never change results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from vllm_compact.kernels.compact_attention import SegmentEntries, gather_segment

if TYPE_CHECKING:  # state.py owns the dense cache; import its types only for annotations
    from vllm_compact.engine.state import CompactSegment


@dataclass
class _GrowingTail:
    """fp32 keys/values [Hkv, capacity, D] of which the first `length` tokens are valid."""

    keys: Tensor
    values: Tensor
    length: int

    @classmethod
    def of(cls, keys: Tensor, values: Tensor) -> _GrowingTail:
        tail = cls(keys.new_empty(keys.shape[0], 0, keys.shape[2]), values.new_empty(values.shape[0], 0, values.shape[2]), 0)
        tail.append(keys, values)
        return tail

    def append(self, keys: Tensor, values: Tensor) -> None:
        """keys/values [Hkv, n, D]; capacity doubles, so a growing tail costs amortised O(1) copies per token."""
        end = self.length + keys.shape[1]
        if end > self.keys.shape[1]:
            capacity = max(64, end, 2 * self.keys.shape[1])
            self.keys = self._moved(self.keys, capacity)
            self.values = self._moved(self.values, capacity)
        self.keys[:, self.length : end] = keys
        self.values[:, self.length : end] = values
        self.length = end

    def _moved(self, buffer: Tensor, capacity: int) -> Tensor:
        grown = buffer.new_empty(buffer.shape[0], capacity, buffer.shape[2])
        grown[:, : self.length] = buffer[:, : self.length]
        return grown

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


@dataclass
class RequestDenseKV:
    """One compacted request's dense segment entries and tail, per layer, for the segment they were built from."""

    segment: "CompactSegment"
    entries: dict[int, SegmentEntries] = field(default_factory=dict)
    tails: dict[int, _GrowingTail] = field(default_factory=dict)

    def segment_entries(self, layer: int, pages: Tensor) -> SegmentEntries:
        entries = self.entries.get(layer)
        if entries is None:
            seg = self.segment
            entries = gather_segment(pages, seg.beta[layer], seg.page_ids, seg.head_start[layer], seg.head_len[layer])
            self.entries[layer] = entries
        return entries

    def tail(
        self, layer: int, tail_len: int, new_keys: Tensor | None, new_values: Tensor | None,
        read_pages: Callable[[], tuple[Tensor, Tensor]],
    ) -> tuple[Tensor, Tensor]:
        """The layer's tail [Hkv, tail_len, D] (this step's tokens last): append them, or rebuild from the pages.

        new_keys/new_values [n, Hkv, D] are this step's tokens as the cache writer received them (None: read pages).
        """
        tail = self.tails.get(layer)
        if tail is not None and new_keys is not None and tail.length + new_keys.shape[0] == tail_len:
            tail.append(new_keys.transpose(0, 1).float(), new_values.transpose(0, 1).float())
        else:
            keys, values = read_pages()
            tail = _GrowingTail.of(keys[:, :tail_len].float(), values[:, :tail_len].float())
            self.tails[layer] = tail
        return tail.keys[:, :tail_len], tail.values[:, :tail_len]

    @property
    def nbytes(self) -> int:
        entries = sum(e.keys.numel() * e.keys.element_size() * 2 + e.bias.numel() * 4 for e in self.entries.values())
        return entries + sum(t.nbytes for t in self.tails.values())


class DenseKVCache:
    """The worker's dense copies, keyed by request; a request's copy is dropped with its compaction state."""

    def __init__(self) -> None:
        self._requests: dict[str, RequestDenseKV] = {}

    def for_request(self, req_id: str, segment: "CompactSegment") -> RequestDenseKV:
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
