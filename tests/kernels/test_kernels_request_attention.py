"""A compacted request's attention (the causal tail alone, and tail + compact entries with beta) against a float64
dense softmax with bottom-right causal alignment."""

from __future__ import annotations

import pytest
import torch

import vllm_compact.kernels.request_attention as attention
from vllm_compact.core.compact_pages import SegmentEntries


@pytest.mark.parametrize("fused,dtype", [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32)])
@pytest.mark.parametrize("nq,tail", [(1, 1), (1, 70), (17, 40), (40, 40), (300, 333)])
def test_tail_attention_matches_float64(fused, dtype, nq, tail, monkeypatch):
    """fp32 to 1e-5; a bf16 model's queries run the fused kernel in bf16 (as vLLM's attention does): 2e-2."""
    if not fused:
        monkeypatch.setattr(attention, "_fused_attention_with_lse", lambda: None)
    g = torch.Generator().manual_seed(nq * 100 + tail)
    num_heads, num_kv_heads, dim = 6, 2, 32
    query = torch.randn(nq, num_heads, dim, generator=g).to(dtype)
    keys = (torch.randn(num_kv_heads, tail, dim, generator=g) * 2).to(dtype).float()  # the dense cache is fp32
    values = torch.randn(num_kv_heads, tail, dim, generator=g).to(dtype).float()
    out, lse = attention.tail_attention(query, keys, values, 0.2)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    group = num_heads // num_kv_heads
    for i in range(nq):
        visible = tail - nq + i + 1  # the query's own token and everything before it
        for h in range(num_heads):
            logits = (query[i, h].double() @ keys[h // group, :visible].double().T) * 0.2
            probs = torch.softmax(logits, 0)
            assert torch.allclose(out[i, h].double(), probs @ values[h // group, :visible].double(), atol=tol)
            assert abs(float(lse[i, h]) - float(torch.logsumexp(logits, 0))) < tol


def _entries(g, num_kv_heads, lengths, dim):
    longest = max(lengths)
    keys = torch.randn(num_kv_heads, longest, dim, generator=g) * 2
    values = torch.randn(num_kv_heads, longest, dim, generator=g)
    bias = torch.randn(num_kv_heads, longest, generator=g) * 2
    for h, n in enumerate(lengths):
        bias[h, n:] = float("-inf")
    return SegmentEntries(keys=keys, values=values, bias=bias)


@pytest.mark.parametrize("nq,tail", [(1, 1), (1, 50), (9, 30), (30, 30)])
def test_compacted_attention_matches_float64(nq, tail):
    """Decode (one token: one softmax over the buffer) and prefill chunks (tail and entries merged by LSE)."""
    g = torch.Generator().manual_seed(nq * 7 + tail)
    num_heads, num_kv_heads, dim, scale = 6, 2, 16, 0.3
    lengths = [5, 11]  # heads of different lengths: padding must carry no weight
    entries = _entries(g, num_kv_heads, lengths, dim)
    query = torch.randn(nq, num_heads, dim, generator=g)
    tail_keys = torch.randn(num_kv_heads, tail, dim, generator=g) * 2
    tail_values = torch.randn(num_kv_heads, tail, dim, generator=g)
    buffers = [torch.cat([e, t], dim=1) for e, t in ((entries.keys, tail_keys), (entries.values, tail_values))]
    bias = torch.cat([entries.bias, torch.zeros(num_kv_heads, tail)], dim=1)
    out = attention.compacted_attention(query, *buffers, bias, max(lengths), scale)
    ref = attention.compacted_attention_ref(query, *buffers, bias, max(lengths), scale)
    group = num_heads // num_kv_heads
    for i in range(nq):
        visible = tail - nq + i + 1
        for h in range(num_heads):
            kv = h // group
            n = lengths[kv]
            keys = torch.cat([entries.keys[kv, :n], tail_keys[kv, :visible]]).double()
            values = torch.cat([entries.values[kv, :n], tail_values[kv, :visible]]).double()
            bias = torch.cat([entries.bias[kv, :n], torch.zeros(visible)]).double()
            probs = torch.softmax(query[i, h].double() @ keys.T * scale + bias, 0)
            torch.testing.assert_close(out[i, h].double(), probs @ values, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ref[i, h].double(), probs @ values, atol=1e-5, rtol=1e-5)
