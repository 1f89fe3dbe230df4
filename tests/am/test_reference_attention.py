"""The span's reference attention (output, lse, row max, per-key scores): both CPU paths against float64 math.

`fused_reference_attention` (torch's flash kernel plus one shifted pass) is what the served CPU path runs;
`tiled_reference_attention` covers causal positions and GPUs. Padding, an existing bias and scored-row subsets
are the cases where the fused path's shortcuts (lse shift, -inf for blind rows) could go wrong.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.am.reference import attend64
from vllm_compact.am import HeadBatch
from vllm_compact.am.attention import (
    ScoreRequest,
    fused_reference_attention,
    reference_attention,
    span_visibility,
    tiled_reference_attention,
)


def _batch(with_bias: bool) -> HeadBatch:
    generator = torch.Generator().manual_seed(3)
    heads, n_keys, n_queries, dim = 5, 300, 40, 16

    def normal(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)

    return HeadBatch(
        # large logits: exp without a stabiliser would overflow fp32
        keys=normal(heads, n_keys, dim, scale=3.0),
        values=normal(heads, n_keys, dim),
        queries=normal(heads, n_queries, dim, scale=3.0),
        scale=torch.tensor([0.25, 0.5, 1.0, 0.75, 0.25]),
        budget=torch.full((heads,), 4),
        key_len=torch.tensor([300, 250, 7, 300, 1]),
        query_len=torch.tensor([40, 0, 3, 40, 40]),
        key_bias=torch.randn(heads, n_keys, generator=generator) if with_bias else None,
    )


def _expected(batch: HeadBatch, rows: torch.Tensor, reduce: str) -> dict[str, list]:
    """Per head, float64: output, lse and row max of the valid rows, and the reduced scores of the scored rows."""
    expected: dict[str, list] = {"output": [], "lse": [], "row_max": [], "scores": []}
    for h in range(batch.num_heads):
        n, t = int(batch.query_len[h]), int(batch.key_len[h])
        queries, keys = batch.queries[h, :n], batch.keys[h, :t]
        bias = None if batch.key_bias is None else batch.key_bias[h, :t]
        scale = float(batch.scale[h])
        output, lse = attend64(queries, keys, batch.values[h, :t], scale, bias)
        logits = scale * queries.double() @ keys.double().T + (0 if bias is None else bias.double()[None, :])
        probs = torch.exp(logits - lse[:, None])[rows[h, :n]]
        if probs.shape[0] == 0:
            scores = torch.zeros(t, dtype=torch.float64)
        elif reduce == "rms":
            scores = probs.square().mean(dim=0).sqrt()
        elif reduce == "mean":
            scores = probs.mean(dim=0)
        else:
            scores = probs.amax(dim=0)
        for name, value in (("output", output), ("lse", lse), ("row_max", logits.amax(dim=1) if n else lse),
                            ("scores", scores)):
            expected[name].append(value)
    return expected


@pytest.mark.parametrize("path", [fused_reference_attention, tiled_reference_attention])
@pytest.mark.parametrize("reduce", ["rms", "mean", "max"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_attention_matches_float64(path, reduce: str, with_bias: bool) -> None:
    batch = _batch(with_bias)
    rows = torch.rand(batch.num_heads, batch.queries.shape[1], generator=torch.Generator().manual_seed(4)) < 0.6
    result = path(batch, span_visibility(batch), ScoreRequest(reduce, rows))
    expected = _expected(batch, rows, reduce)
    for h in range(batch.num_heads):
        n, t = int(batch.query_len[h]), int(batch.key_len[h])
        torch.testing.assert_close(result.output[h, :n].double(), expected["output"][h], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(result.lse[h, :n].double(), expected["lse"][h], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(result.row_max[h, :n].double(), expected["row_max"][h], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(result.key_scores[h, :t].double(), expected["scores"][h], atol=1e-6, rtol=1e-4)
        # padded rows see nothing: -inf lse and row max, zero output; padded keys score nothing
        assert bool((result.lse[h, n:] == -math.inf).all()) and bool((result.row_max[h, n:] == -math.inf).all())
        assert bool((result.output[h, n:] == 0).all())
        assert bool((result.key_scores[h, t:] == 0).all())


def test_served_cpu_path_is_the_fused_one(monkeypatch) -> None:
    """Without causal positions the CPU dispatcher takes the fused path (the one the float64 test checks)."""
    batch = _batch(with_bias=False)
    calls = []
    import vllm_compact.am.attention as attention

    monkeypatch.setattr(attention, "fused_reference_attention", lambda *args: calls.append(args) or "fused")
    assert reference_attention(batch, span_visibility(batch)) == "fused"
    assert len(calls) == 1
