"""The compact-page layout: where a request's compact entries live in its private KV pages.

A compact page is one of vLLM's KV blocks ([Hkv, block_size, 2 * D] per block) viewed as `lanes = Hkv * block_size`
slots of one entry each, key then value: [num_blocks, lanes, 2, D]. Per layer, the entries of all KV heads are packed
back to back in flat slots (head h owns [head_start[h], head_start[h] + head_len[h])), and flat slot f lives in page
`page_ids[f // lanes]`, lane `f % lanes`. Beta is not in the pages: one fp32 value per flat slot, kept beside them.

This module is the only code that writes, reads, gathers or counts compact pages; the Triton kernel
(kernels/compact_attention.py) computes the same address on the GPU and is checked against `gather_layer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SegmentEntries:
    """One layer of one request's compact entries, gathered and padded per KV head."""

    keys: Tensor  # [Hkv, E, D] fp32
    values: Tensor  # [Hkv, E, D] fp32
    bias: Tensor  # [Hkv, E] fp32 (beta), -inf past each head's length


def page_view(kv_cache: Tensor) -> Tensor:
    """A layer's cache [num_blocks, Hkv, bs, 2D] as compact pages [num_blocks, lanes, 2, D] (a view, no copy)."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    return kv_cache.view(num_blocks, num_kv_heads * block_size, 2, two_d // 2)


def pages_for(entries_per_layer: list[int] | tuple[int, ...], lanes: int) -> int:
    """Pages a segment needs: every layer packs its heads back to back, the fullest layer decides."""
    return max(math.ceil(n / lanes) for n in entries_per_layer)


def slots(page_ids: Tensor, flat: Tensor, lanes: int) -> tuple[Tensor, Tensor]:
    """(page row, lane) of flat slots `flat` (any shape) in pages `page_ids`."""
    return page_ids.to(torch.int64)[flat // lanes], flat % lanes


def write_layer(pages: Tensor, page_ids: Tensor, keys: list[Tensor], values: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Pack one layer's entries (per KV head: keys/values [n_h, D]) into `pages`; returns (head_start, head_len)
    int32 [Hkv]. The caller keeps beta in the same order (concatenated over heads)."""
    head_len = torch.tensor([k.shape[0] for k in keys], dtype=torch.int32)
    head_start = torch.cumsum(head_len, 0, dtype=torch.int32) - head_len
    packed_keys, packed_values = torch.cat(keys), torch.cat(values)
    rows, lanes = slots(page_ids, torch.arange(packed_keys.shape[0]), pages.shape[1])
    pages[rows, lanes, 0] = packed_keys.to(pages.dtype)
    pages[rows, lanes, 1] = packed_values.to(pages.dtype)
    return head_start, head_len


def read_head(pages: Tensor, page_ids: Tensor, start: int, length: int) -> tuple[Tensor, Tensor]:
    """Keys and values [length, D] (pages' dtype) of the head that owns flat slots [start, start + length)."""
    rows, lanes = slots(page_ids, torch.arange(start, start + length), pages.shape[1])
    entries = pages[rows, lanes]  # [length, 2, D]
    return entries[:, 0], entries[:, 1]


def gather_layer(pages: Tensor, beta: Tensor, page_ids: Tensor, head_start: Tensor, head_len: Tensor) -> SegmentEntries:
    """All heads of one layer at once, padded to the longest head: page_ids [P], head_start/head_len [Hkv], beta
    [entries of the layer] (indexed by flat slot)."""
    lengths = head_len.to(torch.int64)
    longest = int(lengths.max()) if lengths.numel() else 0
    offsets = torch.arange(longest, device=pages.device)
    valid = offsets[None, :] < lengths[:, None]  # [Hkv, E]
    flat = head_start.to(torch.int64)[:, None] + offsets[None, :]
    flat = torch.where(valid, flat, torch.zeros_like(flat))  # padding reads slot 0 (masked below)
    rows, lanes = slots(page_ids, flat, pages.shape[1])
    entries = pages[rows, lanes].float()  # [Hkv, E, 2, D]
    bias = beta[flat].float()
    bias = torch.where(valid & ~torch.isnan(bias), bias, float("-inf"))
    return SegmentEntries(keys=entries[:, :, 0], values=entries[:, :, 1], bias=bias)
