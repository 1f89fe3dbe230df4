"""The CPU path's dense copies of a compacted request: the growing tail against the pages it mirrors (appends,
rebuilds, new segments)."""

from __future__ import annotations

import torch

from vllm_compact.core.dense_cache import DenseKVCache
from vllm_compact.core.state import CompactSegment


class _Pages:
    """Stands in for the KV pages: the full tail as it is after each step, and how often it was read."""

    def __init__(self, num_kv_heads=2, dim=4):
        self.keys = torch.zeros(num_kv_heads, 0, dim)
        self.values = torch.zeros(num_kv_heads, 0, dim)
        self.reads = 0

    def write(self, n, g):
        new_k = torch.randn(n, self.keys.shape[0], self.keys.shape[2], generator=g)
        new_v = torch.randn(n, self.keys.shape[0], self.keys.shape[2], generator=g)
        self.keys = torch.cat([self.keys, new_k.transpose(0, 1)], 1)
        self.values = torch.cat([self.values, new_v.transpose(0, 1)], 1)
        return new_k, new_v

    def read(self):
        self.reads += 1
        pad = torch.full((self.keys.shape[0], 3, self.keys.shape[2]), float("nan"))  # a partly filled last page
        return torch.cat([self.keys, pad], 1), torch.cat([self.values, pad], 1)


def _segment(g, num_kv_heads=2, dim=4, lanes=8):
    """A one-layer segment in plain compact pages: head h has 3 + 2h entries packed back to back."""
    lengths = torch.tensor([3 + 2 * h for h in range(num_kv_heads)], dtype=torch.int32)
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0)[:-1].int()])
    pages = torch.randn(4, lanes, 2, dim, generator=g)
    segment = CompactSegment(start_block=1, end_block=5, page_ids=torch.tensor([2, 0], dtype=torch.int32),
                             head_start=starts[None], head_len=lengths[None],
                             beta=[torch.randn(int(lengths.sum()), generator=g)],
                             positions=[torch.arange(int(lengths.sum()))])
    return segment, pages


def test_buffer_holds_entries_then_tail_appends_and_rebuilds_only_when_needed():
    g = torch.Generator().manual_seed(0)
    cache, tail_pages = DenseKVCache(), _Pages()
    segment, pages = _segment(g)
    dense = cache.for_request("r", segment)
    for n in [7, 1, 1, 40, 1] + [1] * 100:  # prefill chunks, decodes, growth past capacity
        new_k, new_v = tail_pages.write(n, g)
        kv = dense.layer(0, pages, tail_pages.keys.shape[1], new_k, new_v, tail_pages.read)
        keys, values = kv.tail()
        assert torch.equal(keys, tail_pages.keys) and torch.equal(values, tail_pages.values)
        assert torch.equal(kv.bias[:, kv.num_entries : kv.length], torch.zeros_like(keys[..., 0]))
    assert tail_pages.reads == 1  # only the first step read the pages

    # the entries are the segment's, head h at its packed slots, padding masked
    entries = kv.entries()
    flat = pages.view(-1, 2, 4)
    page_of = {0: 2, 1: 0}
    for h, (start, length) in enumerate(zip(segment.head_start[0].tolist(), segment.head_len[0].tolist())):
        for i in range(length):
            slot = start + i
            lane = page_of[slot // 8] * 8 + slot % 8
            assert torch.equal(entries.keys[h, i], flat[lane, 0]) and torch.equal(entries.values[h, i], flat[lane, 1])
            assert entries.bias[h, i] == segment.beta[0][slot]
        assert bool(torch.isneginf(entries.bias[h, length:]).all())

    # a step the copy did not see (length mismatch) rebuilds from the pages instead of appending
    tail_pages.write(2, g)
    new_k, new_v = tail_pages.write(1, g)
    keys, _ = dense.layer(0, pages, tail_pages.keys.shape[1], new_k, new_v, tail_pages.read).tail()
    assert torch.equal(keys, tail_pages.keys) and tail_pages.reads == 2

    # no step tensors (e.g. a layer sharing another's cache): read the pages
    keys, _ = dense.layer(0, pages, tail_pages.keys.shape[1], None, None, tail_pages.read).tail()
    assert torch.equal(keys, tail_pages.keys) and tail_pages.reads == 3

    # a new segment (re-compaction) starts a new copy; dropping the request frees it
    assert cache.for_request("r", segment) is dense and cache.nbytes > 0
    assert cache.for_request("r", _segment(g)[0]) is not dense
    assert len(cache) == 1 and cache.nbytes == 0
    cache.drop("r")
    assert len(cache) == 0
