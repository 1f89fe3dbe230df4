"""Position-free key selection: RoPE undone (against transformers' rotation) and KeyDiff distinctiveness scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vllm_compact.am import HeadBatch, compact_heads
from vllm_compact.am.rotary import Rotary
from vllm_compact.am.selection import distinct_scores

from .reference import head_inputs, rms_scores64


def _rope64(theta: float, dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 cos/sin [T, D] of Llama's RoPE (duplicated halves, transformers' layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def test_unrotate_inverts_the_rotation_transformers_applies() -> None:
    g = torch.Generator().manual_seed(0)
    heads, length, dim, theta = 3, 40, 16, 10000.0
    positions = torch.randint(0, 500, (length,), generator=g)
    keys = torch.randn(1, heads, length, dim, generator=g, dtype=torch.float64)
    cos, sin = _rope64(theta, dim, positions)
    _, rotated = apply_rotary_pos_emb(keys, keys, cos[None], sin[None])
    assert not torch.allclose(rotated, keys, atol=1e-2)
    rotary = Rotary.from_theta(theta, dim, 512)
    restored = rotary.unrotate(rotated[0], positions.expand(heads, -1))
    assert torch.allclose(restored.double(), keys[0], atol=1e-4)


def _padded(seed: int) -> HeadBatch:
    g = torch.Generator().manual_seed(seed)
    return HeadBatch(
        keys=torch.randn(3, 30, 8, generator=g) + torch.randn(3, 1, 8, generator=g),
        values=torch.randn(3, 30, 8, generator=g),
        queries=2.0 * torch.randn(3, 20, 8, generator=g),
        scale=8**-0.5,
        budget=torch.tensor([6, 2, 11]),
        key_len=torch.tensor([30, 9, 21]),
    )


def test_distinct_scores_match_a_float64_reference() -> None:
    batch = _padded(1)
    scores = distinct_scores(batch)
    for h in range(batch.num_heads):
        keys = head_inputs(batch, h)["keys"].double()
        mean = keys.mean(0)
        expected = 1.0 - (keys @ mean) / (keys.norm(dim=1) * mean.norm())
        n = keys.shape[0]
        assert torch.allclose(scores[h, :n].double(), expected, atol=1e-5)
        assert bool((scores[h, n:] == 0).all())


def test_leverage_scores_match_a_float64_mahalanobis_distance() -> None:
    batch = _padded(4)
    scores = distinct_scores(batch, "leverage")
    for h in range(batch.num_heads):
        keys = head_inputs(batch, h)["keys"].double()
        n, dim = keys.shape
        centred = keys - keys.mean(0)
        cov = torch.from_numpy(np.cov(centred.numpy(), rowvar=False, bias=True))
        cov += 1e-3 * float(cov.trace()) / dim * torch.eye(dim, dtype=torch.float64)
        expected = torch.einsum("td,de,te->t", centred, torch.linalg.inv(cov), centred)
        assert torch.allclose(scores[h, :n].double(), expected, rtol=1e-4, atol=1e-4)
        assert bool((scores[h, n:] == 0).all())


def test_leverage_finds_a_key_rare_along_a_quiet_direction_that_cosine_misses() -> None:
    """The keys vary widely along one direction and barely along another; the odd key is off by a little along
    the quiet one. Its cosine to the mean is ordinary; its leverage is the largest."""
    g = torch.Generator().manual_seed(5)
    length, dim, odd = 80, 8, 23
    keys = torch.zeros(length, dim)
    keys[:, 0] = 4.0
    keys[:, 1] = 2.0 * torch.randn(length, generator=g)
    keys[:, 2:] = 0.01 * torch.randn(length, dim - 2, generator=g)
    keys[odd, 3] += 0.3
    batch = HeadBatch(keys=keys[None], values=torch.randn(1, length, dim, generator=g),
                      queries=torch.randn(1, 4, dim, generator=g), scale=0.25, budget=torch.tensor([4]))
    assert int(distinct_scores(batch, "leverage")[0].argmax()) == odd
    assert int(distinct_scores(batch, "cosine")[0].argmax()) != odd
    with pytest.raises(ValueError, match="distinct metric"):
        distinct_scores(batch, "entropy")


def test_distinct_scores_read_the_keys_with_rope_undone() -> None:
    """One key says something else; the others say the same thing at different positions. Unrotated, that key is
    the most distinct and the rest tie; rotated, position differences swamp it."""
    g = torch.Generator().manual_seed(2)
    length, dim, odd = 64, 16, 37
    content = torch.randn(dim, generator=g).expand(length, dim).clone()
    content[odd] = content[odd] + 0.3 * torch.randn(dim, generator=g)
    positions = 100 + 9 * torch.arange(length)
    cos, sin = _rope64(10000.0, dim, positions)
    _, rotated = apply_rotary_pos_emb(content[None, None].double(), content[None, None].double(), cos[None], sin[None])
    rotated = rotated[0].float()
    rotary = Rotary.from_theta(10000.0, dim, 1024)
    batch = HeadBatch(keys=rotated, values=torch.randn(1, length, dim, generator=g),
                      queries=torch.randn(1, 4, dim, generator=g), scale=0.25, budget=torch.tensor([4]),
                      content_keys=rotary.unrotate(rotated, positions[None]))
    scores = distinct_scores(batch)[0]
    assert int(scores.argmax()) == odd
    others = torch.cat([scores[:odd], scores[odd + 1 :]])
    assert float(others.max() - others.min()) < 1e-5
    on_rotated = distinct_scores(HeadBatch(keys=rotated, values=batch.values, queries=batch.queries, scale=0.25,
                                           budget=batch.budget))[0]
    assert int(on_rotated.argmax()) != odd


@pytest.mark.parametrize("method, options", [
    ("snapkv", {"pool_kernel": 0}),
    ("am-highest-attention", {"holdout_fraction": 0.0}),
])
def test_a_share_of_the_budget_goes_to_the_most_distinct_keys(method: str, options: dict) -> None:
    batch = _padded(3)
    share = 0.5
    result = compact_heads(batch, method, follow_tokens=0, distinct_share=share, **options)
    for h in range(batch.num_heads):
        inp = head_inputs(batch, h)
        budget = int(batch.budget[h])
        by_distinct = math.floor(budget * share)
        attention = rms_scores64(inp["queries"], inp["keys"], inp["scale"], None, "rms")
        chosen = set(attention.topk(budget - by_distinct).indices.tolist())
        keys = inp["keys"].double()
        distinct = 1.0 - (keys @ keys.mean(0)) / (keys.norm(dim=1) * keys.mean(0).norm())
        distinct[list(chosen)] = -math.inf
        chosen |= set(distinct.topk(by_distinct).indices.tolist())
        assert sorted(result.head(h)[0].tolist()) == sorted(chosen)
