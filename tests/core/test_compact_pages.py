"""The compact-page layout module against the layout written out by hand: flat slot f of a layer's entries lives in
page page_ids[f // lanes], lane f % lanes, with lane l of block b at cache[b].view(-1)[l * 2D : (l + 1) * 2D]
(key first, then value)."""

from __future__ import annotations

import pytest
import torch

from vllm_compact.core.compact_pages import gather_layer, page_view, pages_for, read_head, write_layer

NUM_BLOCKS, HKV, BS, D = 7, 3, 4, 8
LANES = HKV * BS


def _slot_by_hand(cache: torch.Tensor, page_ids: list[int], f: int) -> tuple[torch.Tensor, torch.Tensor]:
    block = cache[page_ids[f // LANES]].reshape(-1)
    lane = f % LANES
    return block[lane * 2 * D : lane * 2 * D + D], block[lane * 2 * D + D : (lane + 1) * 2 * D]


def _layer(lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(n, D, generator=g) for n in lengths]
    values = [torch.randn(n, D, generator=g) for n in lengths]
    return keys, values


@pytest.mark.parametrize("lengths", [[5, 1, 9], [12, 12, 12], [0, 3, 0], [13, 2, 20]])
def test_write_puts_each_entry_at_its_slot_and_reads_back(lengths):
    cache = torch.zeros(NUM_BLOCKS, HKV, BS, 2 * D)
    page_ids = [5, 2, 6, 0][: pages_for([sum(lengths)], LANES)]
    keys, values = _layer(lengths)
    start, length = write_layer(page_view(cache), torch.tensor(page_ids, dtype=torch.int32), keys, values)
    assert length.tolist() == lengths
    assert start.tolist() == [sum(lengths[:h]) for h in range(HKV)]
    for h in range(HKV):
        for i in range(lengths[h]):
            k, v = _slot_by_hand(cache, page_ids, int(start[h]) + i)
            assert torch.equal(k, keys[h][i]) and torch.equal(v, values[h][i])
        rk, rv = read_head(page_view(cache), torch.tensor(page_ids), int(start[h]), lengths[h])
        assert torch.equal(rk, keys[h]) and torch.equal(rv, values[h])
    untouched = [b for b in range(NUM_BLOCKS) if b not in page_ids]
    assert not cache[untouched].any()


def test_gather_pads_each_head_with_minus_inf_and_keeps_beta_order():
    lengths = [5, 1, 9]
    cache = torch.zeros(NUM_BLOCKS, HKV, BS, 2 * D)
    page_ids = torch.tensor([3, 1], dtype=torch.int32)
    keys, values = _layer(lengths, seed=1)
    start, length = write_layer(page_view(cache), page_ids, keys, values)
    beta = torch.arange(sum(lengths), dtype=torch.float32) / 10
    entries = gather_layer(page_view(cache), beta, page_ids, start, length)
    assert entries.keys.shape == (HKV, max(lengths), D)
    for h, n in enumerate(lengths):
        assert torch.equal(entries.keys[h, :n], keys[h]) and torch.equal(entries.values[h, :n], values[h])
        assert torch.equal(entries.bias[h, :n], beta[int(start[h]) : int(start[h]) + n])
        assert bool(torch.isneginf(entries.bias[h, n:]).all())


def test_bf16_pages_store_bf16_and_gather_returns_fp32():
    cache = torch.zeros(NUM_BLOCKS, HKV, BS, 2 * D, dtype=torch.bfloat16)
    keys, values = _layer([4, 4, 4], seed=2)
    start, length = write_layer(page_view(cache), torch.tensor([0]), keys, values)
    entries = gather_layer(page_view(cache), torch.zeros(12), torch.tensor([0]), start, length)
    assert entries.keys.dtype == torch.float32
    assert torch.equal(entries.keys[1], keys[1].to(torch.bfloat16).float())


def test_page_view_aliases_the_cache():
    cache = torch.zeros(4, 3, 32, 128)
    pages = page_view(cache)
    assert pages.shape == (4, 96, 2, 64)
    pages[2, 5, 1] = 7.0
    assert float(cache.view(4, -1)[2, 5 * 128 + 64]) == 7.0


@pytest.mark.parametrize("per_layer,expected", [([12], 1), ([13], 2), ([0, 25, 24], 3), ([1, 1], 1)])
def test_pages_for_counts_the_fullest_layer(per_layer, expected):
    assert pages_for(per_layer, LANES) == expected
