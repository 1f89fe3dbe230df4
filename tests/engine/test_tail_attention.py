"""The tail attention of compacted requests against a float64 dense softmax with bottom-right causal alignment."""

from __future__ import annotations

import pytest
import torch

import vllm_compact.integration.attention_backend as attention


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
