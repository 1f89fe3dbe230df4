"""A compacted request's KV of one layer, read in place from its pool pages for one step.

Attention over a compacted request needs its compact entries (with beta) and its physical tail (protected head pages +
pages after the segment, this step's tokens included). Both are read from the pages at every layer of every step,
into buffers that live only for that layer's attention: nothing of the request's KV is held outside the pool
between steps (only the index of where its entries sit, SegmentDecodeIndex, counted in its outside-pool bytes). The reads are cheap because vLLM's blocks are copied whole (one index_select, a memcpy per block) and
only then unpacked from the ISA's tile order (core/stock_pages.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from vllm_compact.core.compact_pages import gather_layer, page_view, slots
from vllm_compact.core.stock_pages import StockBlockLayout

if TYPE_CHECKING:
    from vllm_compact.core.state import CompactSegment


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


@dataclass
class SegmentDecodeIndex:
    """Where a segment's entries sit in the pool, per layer, padded to its longest head. Made once per segment
    (its first decode step) so that a decode step gathers every layer's entries with one index."""

    slots: Tensor  # [L, Hkv, E] int64: row of the pages viewed as [num_blocks * lanes, 2, D] (0 at padding)
    bias: Tensor  # [L, Hkv, E] fp32: beta, -inf at padding

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size() + self.bias.numel() * self.bias.element_size()


def segment_decode_index(segment: CompactSegment, lanes: int) -> SegmentDecodeIndex:
    lengths = segment.head_len.to(torch.int64)  # [L, Hkv]
    offsets = torch.arange(max(1, int(lengths.max())))
    valid = offsets[None, None, :] < lengths[:, :, None]
    flat = torch.where(valid, segment.head_start.to(torch.int64)[:, :, None] + offsets, 0)
    rows, lane = slots(segment.page_ids, flat, lanes)
    bias = torch.stack([beta[flat[layer]] for layer, beta in enumerate(segment.beta)]).float()
    bias = torch.where(valid & ~torch.isnan(bias), bias, float("-inf"))
    return SegmentDecodeIndex(slots=rows * lanes + lane, bias=bias)


class CompactedDecodeBatch:
    """One decode token of each of B compacted requests, attended per layer in one call over [entries ; tail].

    Built once per step. Per layer: one gather of every request's compact entries, one read of every tail block
    (vLLM's tile order undone by the block layout), and one fused softmax whose additive mask carries beta on the
    entries, 0 on the tail and -inf on padding: the exact attention over the compacted cache, with no per-request
    work on the layer's critical path.
    """

    def __init__(self, indexes: list[SegmentDecodeIndex], tail_block_ids: list[Tensor], tail_lens: list[int],
                 block_size: int) -> None:
        longest = max(index.slots.shape[2] for index in indexes)
        pad = [longest - index.slots.shape[2] for index in indexes]
        # [L, B, Hkv, E]: a layer's slice is contiguous
        self.slots = torch.stack([F.pad(ix.slots, (0, p)) for ix, p in zip(indexes, pad)], dim=1)
        self.entry_bias = torch.stack(
            [F.pad(ix.bias, (0, p), value=float("-inf")) for ix, p in zip(indexes, pad)], dim=1)
        blocks = max(ids.numel() for ids in tail_block_ids)
        # short tails are padded with their own first block (read, then masked)
        self.tail_block_ids = torch.cat([torch.cat([ids, ids[:1].expand(blocks - ids.numel())])
                                         for ids in tail_block_ids])
        self.tail_tokens = blocks * block_size
        visible = torch.arange(self.tail_tokens)[None, :] < torch.tensor(tail_lens)[:, None]
        self.tail_bias = torch.where(visible, 0.0, float("-inf"))[:, None, :]  # [B, 1, S]

    @property
    def num_requests(self) -> int:
        return self.slots.shape[1]

    def attend(self, layer: int, query: Tensor, kv_cache: Tensor, layout: StockBlockLayout, scale: float
               ) -> tuple[Tensor, int]:
        """query [B, Hq, D] (model dtype) -> ([B, Hq, D] in the model dtype, bytes of the layer's buffers)."""
        batch, num_heads, head_dim = query.shape
        slots = self.slots[layer]
        entries = page_view(kv_cache).flatten(0, 1).index_select(0, slots.view(-1)).view(*slots.shape, 2, -1)
        num_kv_heads = entries.shape[1]
        tail_keys, tail_values = layout.read(kv_cache, self.tail_block_ids)  # [Hkv, B * S, D]
        tail_shape = (num_kv_heads, batch, self.tail_tokens, head_dim)
        keys = torch.cat([entries[..., 0, :], tail_keys.view(tail_shape).transpose(0, 1)], dim=2)
        values = torch.cat([entries[..., 1, :], tail_values.view(tail_shape).transpose(0, 1)], dim=2)
        tail_bias = self.tail_bias.expand(batch, num_kv_heads, self.tail_tokens)
        mask = torch.cat([self.entry_bias[layer], tail_bias], dim=2)[:, :, None, :]
        # the GQA group of a KV head's query heads as rows of one softmax each (one token: no causal mask)
        grouped = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
        workspace = sum(t.numel() * t.element_size() for t in (keys, values, mask))
        return out.reshape(batch, num_heads, head_dim), workspace
