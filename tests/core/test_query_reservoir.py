"""QueryReservoir holds exactly the queries of a request's last `capacity` tokens, per layer, whatever the chunking."""

from __future__ import annotations

import torch

from vllm_compact.core.state import QueryReservoir


def _rows(t: torch.Tensor) -> list[tuple]:
    return sorted(tuple(r.flatten().tolist()) for r in t)


def test_holds_the_last_capacity_tokens_across_wraps():
    gen = torch.Generator().manual_seed(0)
    layers, capacity, heads, dim = 2, 7, 3, 4
    res = QueryReservoir(layers, capacity, heads, dim, torch.float32)
    seen = [[] for _ in range(layers)]
    for chunk in (3, 1, 5, 12, 2, 7, 1):  # prefill chunks then decode steps; wraps the ring several times
        for layer in range(layers):
            q = torch.randn(chunk, heads, dim, generator=gen)
            res.append(layer, q)
            seen[layer].append(q)
            everything = torch.cat(seen[layer])
            # the independent recomputation: the last `capacity` tokens of everything appended (order is free)
            assert _rows(res.queries(layer)) == _rows(everything[-capacity:])
    assert res.size == capacity


def test_holds_fewer_before_the_window_fills():
    res = QueryReservoir(1, 10, 1, 2, torch.bfloat16)
    q = torch.arange(8.0).view(4, 1, 2).to(torch.bfloat16)
    res.append(0, q)
    assert res.size == 4
    assert torch.equal(res.queries(0), q)


def test_max_reference_queries_sets_the_reservoir_of_a_request():
    """The setting is the reservoir's capacity in tokens (every query head and layer); unset: the recent window."""
    import pytest

    from vllm_compact.config import CompactionConfig
    from vllm_compact.core.state import WorkerCompactionState, WorkerRequest

    for config, capacity in ((CompactionConfig(), 256), (CompactionConfig(max_reference_queries=64), 64),
                             (CompactionConfig(recent_window_tokens=0), 1)):
        state = WorkerCompactionState(config=config, num_layers=3)
        reservoir = state.reservoir(WorkerRequest(captures=True), num_heads=9, head_dim=4, dtype=torch.float32)
        assert reservoir.capacity == config.reference_queries == capacity
        assert reservoir.nbytes == 3 * capacity * 9 * 4 * 4
    with pytest.raises(ValueError, match="at most recent_window_tokens"):
        CompactionConfig(max_reference_queries=300)
