"""Where vLLM's CPU cache writer puts each key and value in a block, probed once per geometry (core/stock_pages.py)."""

from __future__ import annotations

from functools import lru_cache

import torch
from vllm import _custom_ops as ops

from vllm_compact.core.stock_pages import StockBlockLayout, layout_from_codes


def _probe(num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype, isa: str) -> torch.Tensor:
    """Write codes through the stock cache writer; return the raw block (flattened) for three codings."""
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
def stock_block_layout(
    num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype, isa: str
) -> StockBlockLayout:
    try:
        return layout_from_codes(_probe(num_kv_heads, block_size, head_dim, dtype, isa), num_kv_heads, block_size,
                                 head_dim)
    except RuntimeError as e:
        raise RuntimeError(f"{e} ({isa}, {dtype})") from None
