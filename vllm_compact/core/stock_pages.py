"""Reading tokens out of vLLM's own KV blocks, whatever their packing.

vLLM's CPU kernel packs each (block, head) as ISA-specific tiles (transposed K on AVX-512, VNNI pairs on AMX).
Rather than hard-coding those layouts, the integration writes known integers through vLLM's own cache writer into a
scratch block (integration/block_probe.py) and `layout_from_codes` records where each (head, slot, dim) of K and V
landed. The compact pages we own use the plain layout of core/compact_pages.py instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StockBlockLayout:
    key_index: torch.Tensor    # [Hkv, bs, D] int64 offsets into a flattened block
    value_index: torch.Tensor  # [Hkv, bs, D]

    def read(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole blocks: [Hkv, len(block_ids) * bs, D] each, in token order."""
        keys, values = self.read_blocks(kv_cache, block_ids)
        num_kv_heads, block_size, head_dim = self.key_index.shape
        keys = keys.permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
        values = values.permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
        return keys, values

    def read_blocks(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [len(block_ids), Hkv, bs, D] each. Where the packing is a strided view of the block (a
        transposed K, a plain V: vLLM's vector ISAs), the blocks are copied whole and viewed, no element gather."""
        flat = kv_cache.view(kv_cache.shape[0], -1)
        shape = (len(block_ids),) + tuple(self.key_index.shape)
        strided = self._strides
        if strided is not None:
            blocks = flat.index_select(0, block_ids.view(-1).long())  # one memcpy per block
            block_numel = blocks.shape[1]
            (key_offset, key_strides), (value_offset, value_strides) = strided
            keys = blocks.as_strided(shape, (block_numel, *key_strides), blocks.storage_offset() + key_offset)
            values = blocks.as_strided(shape, (block_numel, *value_strides), blocks.storage_offset() + value_offset)
            return keys, values
        rows = block_ids.view(-1, 1)
        keys = flat[rows, self.key_index.view(1, -1)].view(shape)  # one gather of the packed elements
        values = flat[rows, self.value_index.view(1, -1)].view(shape)
        return keys, values

    @functools.cached_property
    def _strides(self) -> tuple[tuple[int, tuple[int, int, int]], tuple[int, tuple[int, int, int]]] | None:
        """(offset, (head, slot, dim) strides) of K and of V when both are affine in (head, slot, dim), else None."""
        key, value = _affine(self.key_index), _affine(self.value_index)
        return (key, value) if key is not None and value is not None else None


def _affine(index: torch.Tensor) -> tuple[int, tuple[int, int, int]] | None:
    base = int(index[0, 0, 0])
    strides = tuple(int(index.select(axis, 1).reshape(-1)[0]) - base if index.shape[axis] > 1 else 0
                    for axis in range(3))
    grids = torch.meshgrid(*(torch.arange(n) for n in index.shape), indexing="ij")
    rebuilt = base + sum(g * stride for g, stride in zip(grids, strides))
    return (base, strides) if torch.equal(rebuilt, index) else None


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
