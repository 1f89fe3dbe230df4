"""Reading tokens out of vLLM's CPU KV pages, whatever their packing, and our own plain compact-page layout.

The stock CPU kernel packs each (block, head) as ISA-specific tiles (transposed K on AVX-512, VNNI pairs on AMX).
Rather than hard-coding those layouts, we probe them once: write known integers through vLLM's own
`cpu_attn_reshape_and_cache` into a scratch block and record where each (head, slot, dim) of K and V landed.
Compact pages are private to a request and use a plain layout we own: the block viewed as
[block_size * num_kv_heads lanes, 2 (key, value), head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class StockBlockLayout:
    key_index: torch.Tensor    # [Hkv, bs, D] int64 offsets into a flattened block
    value_index: torch.Tensor  # [Hkv, bs, D]

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole blocks: [Hkv, len(block_ids) * bs, D] each, in token order."""
        flat = kv_cache.view(kv_cache.shape[0], -1)
        rows = block_ids.view(-1, 1)
        num_kv_heads, block_size, head_dim = self.key_index.shape
        shape = (len(block_ids), num_kv_heads, block_size, head_dim)
        keys = flat[rows, self.key_index.view(1, -1)].view(shape)  # one gather, no copy of whole blocks
        values = flat[rows, self.value_index.view(1, -1)].view(shape)
        keys = keys.permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
        values = values.permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
        return keys, values


def _probe(num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype, isa: str) -> torch.Tensor:
    """Write codes through the stock cache writer; return the raw block (flattened) for three codings."""
    from vllm import _custom_ops as ops

    codes = []
    heads = torch.arange(num_kv_heads).view(1, -1, 1).expand(block_size, num_kv_heads, head_dim)
    slots = torch.arange(block_size).view(-1, 1, 1).expand(block_size, num_kv_heads, head_dim)
    dims = torch.arange(head_dim).view(1, 1, -1).expand(block_size, num_kv_heads, head_dim)
    # Small integers (+1 so that 0 means "not written") are exact in bf16/fp16/fp32; V is coded negative.
    for code in (heads, slots, dims):
        cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
        view = cache.view(1, num_kv_heads, block_size * 2, head_dim)
        key_cache, value_cache = view.chunk(2, dim=2)
        key = (code + 1).to(dtype).contiguous()
        ops.cpu_attn_reshape_and_cache(
            key, -key, key_cache, value_cache, torch.arange(block_size, dtype=torch.int64), isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )
        codes.append(cache.reshape(-1).float())
    return torch.stack(codes)  # [3, block numel]


@lru_cache(maxsize=8)
def stock_block_layout(num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype, isa: str) -> StockBlockLayout:
    codes = _probe(num_kv_heads, block_size, head_dim, dtype, isa)
    numel = codes.shape[1]
    if not bool((codes[0] != 0).all()):
        raise RuntimeError(f"KV layout probe ({isa}, {dtype}) left unwritten elements; cannot decode pages")
    is_value = codes[0] < 0
    head, slot, dim = (codes.abs() - 1).long()
    key_index = torch.full((num_kv_heads, block_size, head_dim), -1, dtype=torch.int64)
    value_index = torch.full_like(key_index, -1)
    offsets = torch.arange(numel)
    key_index[head[~is_value], slot[~is_value], dim[~is_value]] = offsets[~is_value]
    value_index[head[is_value], slot[is_value], dim[is_value]] = offsets[is_value]
    if bool((key_index < 0).any()) or bool((value_index < 0).any()):
        raise RuntimeError(f"KV layout probe ({isa}, {dtype}) is not a bijection; cannot decode pages")
    return StockBlockLayout(key_index, value_index)


def compact_page_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, Hkv, bs, 2D] cache -> [num_blocks, Hkv*bs lanes, 2, D] plain view for compact pages."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    return kv_cache.view(num_blocks, num_kv_heads * block_size, 2, two_d // 2)
