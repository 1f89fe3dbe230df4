"""Attention of one compacted request on CPU: its compact entries (with beta) and its causal tail, merged exactly.

A decode token is one softmax over the request's whole buffer; a prefill chunk takes fused causal attention over the
tail (with its log-sum-exp) and bias-aware attention over the entries, merged by log-sum-exp. `tail_attention_ref` is
the masked-matmul reference of `tail_attention`, `compacted_attention_ref` the one-softmax reference of
`compacted_attention`; tests/kernels/test_kernels_request_attention.py checks all four against float64 softmax.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from vllm_compact.core.compact_pages import SegmentEntries
from vllm_compact.kernels.compact_attention import attend_entries
from vllm_compact.kernels.merge import merge_attention


def _fused_attention_with_lse():
    """torch's CPU flash attention returns the log-sum-exp too; absent in some builds, then plain matmuls."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@lru_cache(maxsize=2)
def _causal_tail_mask(nq: int, tail_len: int, group: int) -> torch.Tensor:
    """[G*nq, t] additive mask, bottom-right aligned; cached because every layer of a step asks for the same one."""
    hidden = torch.arange(tail_len).view(1, tail_len) > torch.arange(tail_len - nq, tail_len).view(nq, 1)
    return torch.zeros(nq, tail_len).masked_fill_(hidden, float("-inf")).repeat(group, 1)


def tail_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of a request's last `nq` tokens over its physical tail, with log-sum-exp.

    query [nq, Hq, D]; keys/values [Hkv, t, D] where the last nq keys are the queries' own tokens. Computed in the
    query's dtype (the model's, as vLLM's own attention); output fp32 [nq, Hq, D], log-sum-exp fp32 [nq, Hq].
    """
    fused = _fused_attention_with_lse()
    if fused is None:
        return tail_attention_ref(query, keys, values, scale)
    nq, num_heads, _ = query.shape
    num_kv_heads, tail_len, _ = keys.shape
    group = num_heads // num_kv_heads
    dtype = query.dtype
    # The chunk's own keys: a square causal block, where the kernel's causal mode skips the hidden half (a dense
    # bottom-right mask would make it compute all of it).
    own_keys = keys[:, tail_len - nq :].to(dtype).repeat_interleave(group, dim=0)
    own_values = values[:, tail_len - nq :].to(dtype).repeat_interleave(group, dim=0)
    out, lse = fused(query.transpose(0, 1)[None], own_keys[None], own_values[None], 0.0, True, scale=scale)[:2]
    out, lse = out[0].transpose(0, 1).float(), lse[0].transpose(0, 1)
    if tail_len == nq:
        return out, lse
    # Earlier tail keys are visible to every query: no mask, GQA group folded into the rows (each KV head read once).
    before = slice(0, tail_len - nq)
    past_out, past_lse = fused(_fold_group(query, num_kv_heads)[None], keys[None, :, before].to(dtype),
                               values[None, :, before].to(dtype), 0.0, False, scale=scale)[:2]
    return merge_attention(out, lse, *_unfold_group(past_out[0], past_lse[0], nq))


def tail_attention_ref(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """tail_attention in plain fp32 matmuls with a bottom-right causal mask (the reference, and the path of torch
    builds without the fused op)."""
    nq, num_heads, _ = query.shape
    num_kv_heads, tail_len, _ = keys.shape
    q = _fold_group(query.float(), num_kv_heads)
    logits = torch.matmul(q, keys.float().transpose(1, 2)) * scale
    logits += _causal_tail_mask(nq, tail_len, num_heads // num_kv_heads)
    lse = torch.logsumexp(logits, dim=-1)  # [Hkv, G*nq]
    out = torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), values.float())
    return _unfold_group(out, lse, nq)


def _fold_group(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[nq, Hq, D] -> [Hkv, G*nq, D]: each KV head's GQA group stacked as query rows (group-major)."""
    nq, num_heads, dim = query.shape
    group = num_heads // num_kv_heads
    return query.view(nq, num_kv_heads, group, dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * nq, dim)


def _unfold_group(out: torch.Tensor, lse: torch.Tensor, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of _fold_group for an attention's output [Hkv, G*nq, D] and log-sum-exp [Hkv, G*nq]."""
    num_kv_heads, rows, dim = out.shape
    group = rows // nq
    out = out.view(num_kv_heads, group, nq, dim).permute(2, 0, 1, 3).reshape(nq, num_kv_heads * group, dim)
    lse = lse.view(num_kv_heads, group, nq).permute(2, 0, 1).reshape(nq, num_kv_heads * group)
    return out, lse


def compacted_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, num_entries: int, scale: float
) -> torch.Tensor:
    """A compacted request's last n tokens query [n, Hq, D] over its buffer [entries ; tail]: keys/values
    [Hkv, E + t, D] fp32, bias [Hkv, E + t] (beta for the E entries, -inf for padding, 0 for the tail, whose last n
    keys are the queries' own tokens). Returns fp32 [n, Hq, D].

    One token (decode) is a single softmax over the whole buffer; a prefill chunk takes the fused causal tail
    attention and the entries separately, merged by log-sum-exp, so its [n, t] logits are never built in Python.
    """
    n, num_heads, dim = query.shape
    if n == 1:
        return decode_attention(query[0], keys, values, bias, scale).view(1, num_heads, dim)
    e = num_entries
    tail = tail_attention(query, keys[:, e:], values[:, e:], scale)
    num_kv_heads = keys.shape[0]
    q = query.float().view(n, num_kv_heads, num_heads // num_kv_heads, dim)
    segment_out, segment_lse = attend_entries(q, SegmentEntries(keys[:, :e], values[:, :e], bias[:, :e]), scale)
    return merge_attention(*tail, segment_out.view(n, num_heads, dim), segment_lse.view(n, num_heads))[0]


def compacted_attention_ref(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, num_entries: int, scale: float
) -> torch.Tensor:
    """compacted_attention as one masked fp32 softmax over the whole buffer (entries always visible, the tail
    causal and bottom-right aligned): [n, Hq, D]."""
    n, num_heads, dim = query.shape
    num_kv_heads, length, _ = keys.shape
    group = num_heads // num_kv_heads
    q = _fold_group(query.float(), num_kv_heads)  # [Hkv, G*n, D]
    logits = torch.matmul(q, keys.float().transpose(1, 2)) * scale + bias.float()[:, None, :]
    tail_len = length - num_entries
    logits[:, :, num_entries:] += _causal_tail_mask(n, tail_len, group)
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), values.float())
    return _unfold_group(out, lse, n)[0]


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query token [Hq, D] over a request's whole buffer (keys/values [Hkv, n, D] fp32, bias [Hkv, n]; its own
    token is the last): fp32 [Hq, D].

    One fused call (beta as the additive mask, the GQA group as the query rows) instead of five ops; it runs once per
    layer for every compacted request, and its cost there is mostly reading the request's buffer from memory."""
    num_heads, dim = query.shape
    num_kv_heads = keys.shape[0]
    q = query.float().view(1, num_kv_heads, num_heads // num_kv_heads, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, keys[None], values[None], attn_mask=bias[None, :, None], scale=scale
    )
    return out.view(num_heads, dim)
