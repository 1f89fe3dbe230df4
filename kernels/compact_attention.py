"""Attention of query tokens over the compact segments stored in KV pages, straight from the pages (paged).

GPU only and on no engine path yet: the CPU engine attends over dense per-request copies (request_attention.py);
this kernel is what a GPU backend would call (docs/gpu.md). `attend_entries` is shared with the CPU path.

The pages use the compact-page layout of core/compact_pages.py (entry i of KV head h of request r at flat slot
f = head_start[r,h] + i, page block_table[r, f // L], lane f % L; bias beta[beta_start[r] + f]); the Triton kernel
computes that address itself and is checked against the layout module's gather. Query head j reads KV head
j // (Hq // Hkv). No causal mask. Returns the normalised output and its natural-log logsumexp (for merging with the rest of the cache).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_compact.core.compact_pages import SegmentEntries, gather_layer
from vllm_compact.kernels._dispatch import dot_precision, interpreter_safe, jit, next_power_of_2, use_triton

try:  # optional: kernel bodies only need `tl` when they are jitted
    import triton.language as tl
except Exception:
    tl = None

# Elements of one fp32 logits chunk [queries, Hq, entries] in the torch reference (~128 MiB).
_REF_CHUNK_ELEMENTS = 1 << 25


def _gather_request(
    kv_pages: Tensor, beta: Tensor, block_table: Tensor, beta_start: Tensor, head_start: Tensor,
    head_len: Tensor, request: int,
) -> SegmentEntries:
    return gather_layer(kv_pages, beta[int(beta_start[request]) :], block_table[request], head_start[request],
                        head_len[request])


def attend_entries(queries: Tensor, entries: SegmentEntries, scale: float) -> tuple[Tensor, Tensor]:
    """queries [n, Hkv, G, D] fp32 -> out [n, Hkv, G, D] fp32, lse [n, Hkv, G] (-inf, out 0 where nothing is seen)."""
    logits = torch.einsum("nhgd,hed->nhge", queries, entries.keys) * scale + entries.bias[None, :, None, :]
    logits = torch.where(torch.isnan(logits), float("-inf"), logits)
    lse = torch.logsumexp(logits, dim=-1)
    sees = torch.isfinite(lse)
    probs = torch.exp(logits - torch.where(sees, lse, 0.0)[..., None])
    out = torch.einsum("nhge,hed->nhgd", probs, entries.values)
    out = torch.where(sees[..., None], out, torch.zeros_like(out))
    return out, torch.where(sees, lse, float("-inf"))


def compact_attention_ref(
    query: Tensor,
    kv_pages: Tensor,
    beta: Tensor,
    block_table: Tensor,
    beta_start: Tensor,
    head_start: Tensor,
    head_len: Tensor,
    query_req: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Torch implementation (the CPU production path): one gather per request, batched over its heads."""
    n_tokens, q_heads, dim = query.shape
    kv_heads = head_start.shape[1]
    group = q_heads // kv_heads
    out = torch.zeros(n_tokens, q_heads, dim, dtype=torch.float32, device=query.device)
    lse = torch.full((n_tokens, q_heads), float("-inf"), dtype=torch.float32, device=query.device)
    query_req = query_req.to(torch.int64)
    for request in torch.unique(query_req).tolist():
        if int(head_len[request].max()) <= 0:
            continue
        entries = _gather_request(kv_pages, beta, block_table, beta_start, head_start, head_len, request)
        tokens = (query_req == request).nonzero()[:, 0]
        chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, q_heads * entries.bias.shape[1]))
        for start in range(0, tokens.numel(), chunk):
            rows = tokens[start : start + chunk]
            q = query[rows].float().view(-1, kv_heads, group, dim)
            o, l = attend_entries(q, entries, float(scale))
            out[rows] = o.view(-1, q_heads, dim)
            lse[rows] = l.view(-1, q_heads)
    return out.to(query.dtype), lse


def compact_attention(
    query: Tensor,
    kv_pages: Tensor,
    beta: Tensor,
    block_table: Tensor,
    beta_start: Tensor,
    head_start: Tensor,
    head_len: Tensor,
    query_req: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Triton on CUDA tensors (or when forced), else the torch reference. out [N,Hq,D] (query dtype), lse [N,Hq]."""
    impl = compact_attention_triton if use_triton(query, kv_pages) else compact_attention_ref
    return impl(query, kv_pages, beta, block_table, beta_start, head_start, head_len, query_req, scale)


# ---------------------------------------------------------------------------------------------------- Triton


def _compact_attention_kernel(
    q_ptr, kv_ptr, beta_ptr, table_ptr, beta_start_ptr, head_start_ptr, head_len_ptr, req_ptr, out_ptr, lse_ptr,
    scale, lanes, dim, group,
    sq_n, sq_h, sq_d, skv_b, skv_l, skv_s, skv_d, st_r, st_p, shs_r, shs_h, shl_r, shl_h,
    so_n, so_h, so_d, sl_n, sl_h,
    PRECISION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query token, KV head): all G query heads of the group, online softmax over the entries."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    request = tl.load(req_ptr + token).to(tl.int64)
    start = tl.load(head_start_ptr + request * shs_r + kv_head * shs_h).to(tl.int64)
    length = tl.load(head_len_ptr + request * shl_r + kv_head * shl_h)
    beta_base = tl.load(beta_start_ptr + request)
    heads = kv_head * group + tl.arange(0, BLOCK_G)
    head_ok = tl.arange(0, BLOCK_G) < group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    q = tl.load(q_ptr + token * sq_n + heads[:, None] * sq_h + dims[None, :] * sq_d,
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for e0 in range(0, length, BLOCK_E):
        offsets = e0 + tl.arange(0, BLOCK_E)
        entry_ok = offsets < length
        flat = start + offsets
        page = tl.load(table_ptr + request * st_r + (flat // lanes) * st_p, mask=entry_ok, other=0).to(tl.int64)
        slot = kv_ptr + page * skv_b + (flat % lanes) * skv_l
        k = tl.load(slot[:, None] + dims[None, :] * skv_d, mask=entry_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(slot[:, None] + skv_s + dims[None, :] * skv_d, mask=entry_ok[:, None] & dim_ok[None, :], other=0.0)
        bias = tl.load(beta_ptr + beta_base + flat, mask=entry_ok, other=float("-inf"))
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias[None, :]
        logits = tl.where(entry_ok[None, :] & (logits == logits), logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - safe_max)
        probs = tl.exp(logits - safe_max[:, None])
        run_sum = run_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        run_max = new_max
    sees = run_sum > 0
    out = tl.where(sees[:, None], acc / tl.where(sees, run_sum, 1.0)[:, None], 0.0)
    lse = tl.where(sees, run_max + tl.log(tl.maximum(run_sum, 1.0)), float("-inf"))
    tl.store(out_ptr + token * so_n + heads[:, None] * so_h + dims[None, :] * so_d,
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + token * sl_n + heads * sl_h, lse, mask=head_ok)


def compact_attention_triton(
    query: Tensor,
    kv_pages: Tensor,
    beta: Tensor,
    block_table: Tensor,
    beta_start: Tensor,
    head_start: Tensor,
    head_len: Tensor,
    query_req: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Triton implementation: one program per (token, KV head), streaming the head's entries through its pages."""
    n_tokens, q_heads, dim = query.shape
    kv_heads = head_start.shape[1]
    group = q_heads // kv_heads
    out_dtype = query.dtype
    query = interpreter_safe(query)
    out = torch.empty_like(query)
    lse = torch.empty(n_tokens, q_heads, dtype=torch.float32, device=query.device)
    if n_tokens == 0:
        return out.to(out_dtype), lse
    beta = beta.float()
    kv_pages = kv_pages.to(query.dtype)
    block_d = max(16, next_power_of_2(dim))
    jit(_compact_attention_kernel)[(n_tokens, kv_heads)](
        query, kv_pages, beta, block_table, beta_start, head_start, head_len, query_req, out, lse,
        float(scale), kv_pages.shape[1], dim, group,
        *query.stride(), *kv_pages.stride(), *block_table.stride(), *head_start.stride(), *head_len.stride(),
        *out.stride(), *lse.stride(),
        PRECISION=dot_precision(query.dtype), BLOCK_G=max(16, next_power_of_2(group)), BLOCK_E=64, BLOCK_D=block_d,
    )
    return out.to(out_dtype), lse
