"""Reading tokens out of vLLM's own KV blocks, whatever their packing.

vLLM's CPU kernel packs each (block, head) as ISA-specific tiles (transposed K on AVX-512, VNNI pairs on AMX).
Rather than hard-coding those layouts, the integration writes known integers through vLLM's own cache writer into a
scratch block (integration/block_probe.py) and `layout_from_codes` records where each (head, slot, dim) of K and V
landed. The compact pages we own use the plain layout of core/compact_pages.py instead.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def layout_from_codes(codes: torch.Tensor, num_kv_heads: int, block_size: int, head_dim: int) -> StockBlockLayout:
    """codes [3, block numel]: the flattened block after writing key = head+1, slot+1, dim+1 (values negated) for
    every (slot, head, dim), one coding per row. Raises if the writer left elements unwritten or collided."""
    numel = codes.shape[1]
    if not bool((codes[0] != 0).all()):
        raise RuntimeError("KV layout probe left unwritten elements; cannot decode pages")
    is_value = codes[0] < 0
    head, slot, dim = (codes.abs() - 1).long()
    key_index = torch.full((num_kv_heads, block_size, head_dim), -1, dtype=torch.int64)
    value_index = torch.full_like(key_index, -1)
    offsets = torch.arange(numel)
    key_index[head[~is_value], slot[~is_value], dim[~is_value]] = offsets[~is_value]
    value_index[head[is_value], slot[is_value], dim[is_value]] = offsets[is_value]
    if bool((key_index < 0).any()) or bool((value_index < 0).any()):
        raise RuntimeError("KV layout probe is not a bijection; cannot decode pages")
    return StockBlockLayout(key_index, value_index)
