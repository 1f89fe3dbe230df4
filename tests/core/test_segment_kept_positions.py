"""What a compact segment says it kept (research.needle_kept reads it) against the packed layout by hand."""

from __future__ import annotations

import torch

from vllm_compact.core.state import CompactSegment


def test_kept_positions_unpack_each_heads_own_range():
    # Two layers, two KV heads; layer 0 packs lengths [2, 3], layer 1 [1, 0].
    positions = [torch.tensor([10, 14, 3, 7, 9]), torch.tensor([42])]
    segment = CompactSegment(
        start_block=0, end_block=4, page_ids=torch.tensor([1], dtype=torch.int32),
        head_start=torch.tensor([[0, 2], [0, 1]], dtype=torch.int32),
        head_len=torch.tensor([[2, 3], [1, 0]], dtype=torch.int32),
        beta=[torch.zeros(5), torch.zeros(1)], positions=positions,
    )
    assert segment.kept_positions() == [[[10, 14], [3, 7, 9]], [[42], []]]

