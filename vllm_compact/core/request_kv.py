"""A compacted request's KV of one layer, read in place from its pool pages for one step.

Attention over a compacted request needs its compact entries (with beta) and its physical tail (protected head pages +
pages after the segment, this step's tokens included). Both are read from the pages at every layer of every step,
into buffers that live only for that layer's attention: nothing of the request's KV is held outside the pool
between steps. The reads are cheap because vLLM's blocks are copied whole (one index_select, a memcpy per block) and
only then unpacked from the ISA's tile order (core/stock_pages.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_compact.core.compact_pages import gather_layer, page_view
from vllm_compact.core.state import CompactSegment
from vllm_compact.core.stock_pages import StockBlockLayout


@dataclass
class RequestLayerKV:
    """[compact entries ; tail] of one layer: keys/values [Hkv, E + t, D] fp32, bias [Hkv, E + t] fp32 (beta for
    the E entry columns, -inf for per-head padding, 0 for the tail)."""

    keys: Tensor
    values: Tensor
    bias: Tensor
    num_entries: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.bias))


def read_request_kv(
    segment: CompactSegment, layer: int, kv_cache: Tensor, layout: StockBlockLayout, tail_block_ids: Tensor,
    tail_len: int,
) -> RequestLayerKV:
    """The request's layer `layer` as one buffer, from its compact pages and its tail blocks in `kv_cache`."""
    entries = gather_layer(page_view(kv_cache), segment.beta[layer], segment.page_ids, segment.head_start[layer],
                           segment.head_len[layer])
    tail_keys, tail_values = layout.read(kv_cache, tail_block_ids)
    tail_keys, tail_values = tail_keys[:, :tail_len].float(), tail_values[:, :tail_len].float()
    bias = torch.cat([entries.bias, entries.bias.new_zeros(entries.bias.shape[0], tail_len)], dim=1)
    return RequestLayerKV(
        keys=torch.cat([entries.keys, tail_keys], dim=1),
        values=torch.cat([entries.values, tail_values], dim=1),
        bias=bias,
        num_entries=entries.bias.shape[1],
    )
