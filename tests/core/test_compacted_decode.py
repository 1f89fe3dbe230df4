"""Decode tokens of several compacted requests in one call (CompactedDecodeBatch) against float64 attention over each
request's own [compact entries with beta ; tail], read element by element from the pool."""

from __future__ import annotations

import torch

from vllm_compact.core.request_kv import CompactedDecodeBatch, segment_decode_index
from vllm_compact.core.state import CompactSegment
from vllm_compact.core.stock_pages import StockBlockLayout

NUM_BLOCKS, NUM_KV_HEADS, BLOCK, DIM, GROUP, LAYERS = 24, 2, 8, 16, 3, 2
LANES = NUM_KV_HEADS * BLOCK


def _plain_layout() -> StockBlockLayout:
    """A block [Hkv, bs, 2D] with K in the first D lanes of a slot and V in the next D (one valid vLLM packing)."""
    head, slot, dim = torch.meshgrid(torch.arange(NUM_KV_HEADS), torch.arange(BLOCK), torch.arange(DIM), indexing="ij")
    key_index = (head * BLOCK + slot) * 2 * DIM + dim
    return StockBlockLayout(key_index=key_index, value_index=key_index + DIM)


def _segment(g: torch.Generator, pages: list[int], head_len: list[list[int]]) -> CompactSegment:
    """Heads packed back to back per layer, beta random (NaN in padding would be a bug to read)."""
    lengths = torch.tensor(head_len, dtype=torch.int32)
    starts = torch.cumsum(lengths, dim=1) - lengths
    return CompactSegment(
        start_block=1, end_block=5, page_ids=torch.tensor(pages, dtype=torch.int32), head_start=starts.int(),
        head_len=lengths, beta=[torch.randn(int(row.sum()), generator=g) * 2 for row in lengths],
        positions=[torch.arange(int(row.sum())) for row in lengths],
    )


def _reference(cache: torch.Tensor, segment: CompactSegment, tail_blocks: list[int], tail_len: int, layer: int,
               query: torch.Tensor, scale: float) -> torch.Tensor:
    """[Hq, D] float64: each query head over its KV head's entries (slot by slot from the pages) and tail tokens."""
    out = torch.zeros(GROUP * NUM_KV_HEADS, DIM, dtype=torch.float64)
    for kv_head in range(NUM_KV_HEADS):
        keys, values, bias = [], [], []
        start, length = int(segment.head_start[layer, kv_head]), int(segment.head_len[layer, kv_head])
        for entry in range(start, start + length):
            page, lane = int(segment.page_ids[entry // LANES]), entry % LANES
            row = cache[page].view(LANES, 2 * DIM)[lane]
            keys.append(row[:DIM]), values.append(row[DIM:]), bias.append(float(segment.beta[layer][entry]))
        for token in range(tail_len):
            row = cache[tail_blocks[token // BLOCK], kv_head, token % BLOCK]
            keys.append(row[:DIM]), values.append(row[DIM:]), bias.append(0.0)
        keys, values = torch.stack(keys).double(), torch.stack(values).double()
        for q_head in range(kv_head * GROUP, (kv_head + 1) * GROUP):
            probs = torch.softmax(keys @ query[q_head].double() * scale + torch.tensor(bias, dtype=torch.float64), 0)
            out[q_head] = probs @ values
    return out


def test_batched_decode_matches_each_requests_own_attention() -> None:
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * DIM, generator=g) * 2).bfloat16()
              for _ in range(LAYERS)]
    # heads of different lengths, layers of different lengths, one head with no entries at all
    segments = [_segment(g, [3, 7], [[5, 11], [0, 20]]), _segment(g, [9, 12, 15], [[30, 2], [17, 9]])]
    tails = [([0, 20], 11), ([2, 4, 6], 17)]  # (blocks, valid tokens): the last block is partly filled
    batch = CompactedDecodeBatch([segment_decode_index(s, LANES) for s in segments],
                                 [torch.tensor(blocks) for blocks, _ in tails], [n for _, n in tails], BLOCK)
    queries = torch.randn(len(segments), GROUP * NUM_KV_HEADS, DIM, generator=g).bfloat16()
    for layer in range(LAYERS):
        got, workspace = batch.attend(layer, queries, caches[layer], _plain_layout(), 0.3)
        assert got.dtype == torch.bfloat16 and got.shape == queries.shape and workspace > 0
        for r, (segment, (blocks, tail_len)) in enumerate(zip(segments, tails)):
            want = _reference(caches[layer], segment, blocks, tail_len, layer, queries[r], 0.3)
            torch.testing.assert_close(got[r].double(), want, atol=2e-2, rtol=2e-2)


def test_decode_index_points_at_each_entry_and_masks_padding() -> None:
    segment = _segment(torch.Generator().manual_seed(1), [4, 9], [[3, 0], [1, 6]])
    index = segment_decode_index(segment, LANES)
    assert index.slots.shape == index.bias.shape == (LAYERS, NUM_KV_HEADS, 6)
    for layer in range(LAYERS):
        for head in range(NUM_KV_HEADS):
            start, length = int(segment.head_start[layer, head]), int(segment.head_len[layer, head])
            for e in range(6):
                if e < length:
                    flat = start + e
                    assert int(index.slots[layer, head, e]) == int(segment.page_ids[flat // LANES]) * LANES + flat % LANES
                    assert float(index.bias[layer, head, e]) == float(segment.beta[layer][flat])
                else:
                    assert float(index.bias[layer, head, e]) == float("-inf")


def test_a_packing_that_is_no_strided_view_is_read_by_gather_with_the_same_tokens():
    """vLLM's AMX packing is not a strided view of the block: the layout then gathers element by element. The same
    tokens stored under a shuffled packing read back exactly as under the plain one (which takes the view path)."""
    plain = _plain_layout()
    assert plain._strides is not None
    shuffle = torch.randperm(NUM_KV_HEADS * BLOCK * 2 * DIM, generator=torch.Generator().manual_seed(5))
    shuffled = StockBlockLayout(key_index=shuffle[plain.key_index], value_index=shuffle[plain.value_index])
    assert shuffled._strides is None
    cache = torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK, 2 * DIM).bfloat16()
    packed = torch.empty_like(cache).view(NUM_BLOCKS, -1)
    packed[:, shuffle] = cache.view(NUM_BLOCKS, -1)  # element e of the plain block lands at shuffle[e]
    blocks = torch.tensor([7, 2, 19])
    for want, got in zip(plain.read(cache, blocks), shuffled.read(packed.view_as(cache), blocks)):
        assert torch.equal(want, got)
