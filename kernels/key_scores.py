"""Per-key attention scores of reference queries (step 1 of Attention Matching: choosing C1).

A_ij = exp(s q_i.k_j + bias_j - lse_i) over the keys visible to query i; score_j reduces A_ij over the valid
queries that see at least one key ("rms", "mean" or "max"). Also returns lse_i (natural log).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_compact.kernels._dispatch import cdiv, dot_precision, interpreter_safe, jit, next_power_of_2, use_triton

try:  # optional: kernel bodies only need `tl` when they are jitted
    import triton.language as tl
except Exception:
    tl = None

REDUCTIONS = ("rms", "mean", "max")
# Elements of one fp32 logits chunk in the torch reference ([H, chunk, T]); bounds its memory to ~128 MiB.
_REF_CHUNK_ELEMENTS = 1 << 25


@dataclass
class KeyScores:
    scores: Tensor  # [H, T] fp32, per-key score reduced over valid queries (0 for invalid keys)
    lse: Tensor  # [H, N] fp32, logsumexp over visible keys; -inf for invalid/blind rows


@dataclass
class _Masks:
    """Validity of queries/keys and the causal positions, normalised for both implementations."""

    query_valid: Tensor  # [H, N] bool
    key_valid: Tensor  # [H, T] bool
    query_pos: Tensor | None  # [H, N] int64
    key_pos: Tensor | None  # [H, T] int64


def _check_args(queries: Tensor, keys: Tensor, query_pos: Tensor | None, key_pos: Tensor | None, reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if (query_pos is None) != (key_pos is None):
        raise ValueError("query_pos and key_pos must be given together")
    if queries.dim() != 3 or keys.dim() != 3 or queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
        raise ValueError(f"queries [H,N,D] and keys [H,T,D] do not match: {tuple(queries.shape)} {tuple(keys.shape)}")


def _length_mask(length: Tensor | None, heads: int, size: int, device: torch.device) -> Tensor:
    positions = torch.arange(size, device=device)
    if length is None:
        return torch.ones(heads, size, dtype=torch.bool, device=device)
    return positions[None, :] < length.to(device=device, dtype=torch.int64)[:, None]


def _scale_per_head(scale: float | Tensor, heads: int, device: torch.device) -> Tensor:
    if isinstance(scale, Tensor):
        return scale.to(device=device, dtype=torch.float32).reshape(-1).expand(heads).contiguous()
    return torch.full((heads,), float(scale), dtype=torch.float32, device=device)


def _chunk_logits(
    queries: Tensor, keys_f32: Tensor, scale: Tensor, bias: Tensor | None, masks: _Masks, start: int, stop: int
) -> Tensor:
    """Masked fp32 logits [H, chunk, T] for queries start:stop; invisible or NaN entries are -inf."""
    logits = torch.bmm(queries[:, start:stop].float(), keys_f32.transpose(1, 2))
    logits.mul_(scale[:, None, None])
    if bias is not None:
        logits.add_(bias[:, None, :])
    visible = masks.key_valid[:, None, :] & masks.query_valid[:, start:stop, None]
    if masks.query_pos is not None:
        visible = visible & (masks.key_pos[:, None, :] <= masks.query_pos[:, start:stop, None])
    visible = visible & ~torch.isnan(logits)
    return logits.masked_fill_(~visible, float("-inf"))


def key_scores_ref(
    queries: Tensor,
    keys: Tensor,
    scale: float | Tensor,
    *,
    query_len: Tensor | None = None,
    key_len: Tensor | None = None,
    key_bias: Tensor | None = None,
    query_pos: Tensor | None = None,
    key_pos: Tensor | None = None,
    reduce: str = "rms",
) -> KeyScores:
    """Torch implementation (the CPU production path): dense logits in chunks of queries."""
    _check_args(queries, keys, query_pos, key_pos, reduce)
    heads, n_queries, _ = queries.shape
    n_keys = keys.shape[1]
    device = keys.device
    masks = _Masks(
        query_valid=_length_mask(query_len, heads, n_queries, device),
        key_valid=_length_mask(key_len, heads, n_keys, device),
        query_pos=None if query_pos is None else query_pos.to(device=device, dtype=torch.int64),
        key_pos=None if key_pos is None else key_pos.to(device=device, dtype=torch.int64),
    )
    scale_h = _scale_per_head(scale, heads, device)
    bias = None if key_bias is None else key_bias.to(device=device, dtype=torch.float32)
    keys_f32 = keys.float()

    if _unmasked_and_finite(queries, keys_f32, bias, masks):
        return _unmasked_scores(queries, keys_f32, scale_h, bias, reduce)

    lse = torch.full((heads, n_queries), float("-inf"), dtype=torch.float32, device=device)
    accum = torch.zeros(heads, n_keys, dtype=torch.float32, device=device)
    seen = torch.zeros(heads, dtype=torch.float32, device=device)  # valid queries that see a key
    chunk = max(1, _REF_CHUNK_ELEMENTS // max(1, heads * n_keys))
    for start in range(0, n_queries, chunk):
        stop = min(n_queries, start + chunk)
        logits = _chunk_logits(queries, keys_f32, scale_h, bias, masks, start, stop)
        row_lse = torch.logsumexp(logits, dim=2)  # -inf where a row sees nothing
        sees = torch.isfinite(row_lse)
        lse[:, start:stop] = torch.where(sees, row_lse, float("-inf"))
        probs = torch.exp(logits - torch.where(sees, row_lse, 0.0)[:, :, None])  # exp(-inf) = 0 where invisible
        seen += sees.sum(dim=1)
        if reduce == "rms":
            accum += probs.square().sum(dim=1)
        elif reduce == "mean":
            accum += probs.sum(dim=1)
        else:
            accum = torch.maximum(accum, probs.amax(dim=1))
    return KeyScores(scores=_finish_reduction(accum, seen, reduce), lse=lse)


# Elements of one fp32 logits tile in the unmasked path: small enough to stay in cache (~2 MiB).
_FAST_TILE_ELEMENTS = 1 << 19


def _unmasked_and_finite(queries, keys_f32, bias, masks) -> bool:
    """Nothing to mask and nothing non-finite: the lean tiled path gives the same numbers with far less work."""
    if masks.query_pos is not None or not bool(masks.query_valid.all()) or not bool(masks.key_valid.all()):
        return False
    if bias is not None and not bool(torch.isfinite(bias).all()):
        return False
    return bool(torch.isfinite(keys_f32).all()) and bool(torch.isfinite(queries).all())


def _unmasked_scores(queries: Tensor, keys_f32: Tensor, scale: Tensor, bias: Tensor | None, reduce: str) -> KeyScores:
    heads, n_queries, _ = queries.shape
    n_keys = keys_f32.shape[1]
    keys_t = keys_f32.transpose(1, 2)
    lse = torch.empty(heads, n_queries, dtype=torch.float32, device=keys_f32.device)
    accum = torch.zeros(heads, n_keys, dtype=torch.float32, device=keys_f32.device)
    rows = max(1, _FAST_TILE_ELEMENTS // n_keys)
    head_chunk = max(1, _FAST_TILE_ELEMENTS // (n_keys * n_queries)) if rows >= n_queries else 1
    for h0 in range(0, heads, head_chunk):
        h1 = min(heads, h0 + head_chunk)
        for r0 in range(0, n_queries, rows):
            r1 = min(n_queries, r0 + rows)
            logits = torch.bmm(queries[h0:h1, r0:r1].float(), keys_t[h0:h1]).mul_(scale[h0:h1, None, None])
            if bias is not None:
                logits.add_(bias[h0:h1, None, :])
            row_max = logits.amax(dim=2, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            total = probs.sum(dim=2, keepdim=True)
            lse[h0:h1, r0:r1] = (row_max + total.log()).squeeze(2)
            probs.div_(total)
            if reduce == "rms":
                accum[h0:h1] += probs.square_().sum(dim=1)
            elif reduce == "mean":
                accum[h0:h1] += probs.sum(dim=1)
            else:
                accum[h0:h1] = torch.maximum(accum[h0:h1], probs.amax(dim=1))
    seen = torch.full((heads,), float(n_queries), dtype=torch.float32, device=keys_f32.device)
    return KeyScores(scores=_finish_reduction(accum, seen, reduce), lse=lse)


def _finish_reduction(accum: Tensor, seen: Tensor, reduce: str) -> Tensor:
    if reduce == "max":
        return accum
    mean = accum / seen.clamp(min=1.0)[:, None]
    return mean.sqrt() if reduce == "rms" else mean


def key_scores(
    queries: Tensor,
    keys: Tensor,
    scale: float | Tensor,
    *,
    query_len: Tensor | None = None,
    key_len: Tensor | None = None,
    key_bias: Tensor | None = None,
    query_pos: Tensor | None = None,
    key_pos: Tensor | None = None,
    reduce: str = "rms",
) -> KeyScores:
    """Triton on CUDA tensors (or when forced), else the torch reference. Same signature as `key_scores_ref`."""
    impl = key_scores_triton if use_triton(queries, keys) else key_scores_ref
    return impl(
        queries, keys, scale, query_len=query_len, key_len=key_len, key_bias=key_bias,
        query_pos=query_pos, key_pos=key_pos, reduce=reduce,
    )



# ---------------------------------------------------------------------------------------------------- Triton


def _lse_pass(
    q_ptr, k_ptr, bias_ptr, qpos_ptr, kpos_ptr, qlen_ptr, klen_ptr, scale_ptr, lse_ptr,
    n_queries, n_keys, dim,
    sq_h, sq_n, sq_d, sk_h, sk_t, sk_d, sb_h, sb_t, sqp_h, sqp_n, skp_h, skp_t, sl_h, sl_n,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 1: lse_i over visible keys for a block of queries, streaming over keys (online max/sum)."""
    head = tl.program_id(0).to(tl.int64)  # offsets of later heads can pass 2^31
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q_len = tl.load(qlen_ptr + head)
    k_len = tl.load(klen_ptr + head)
    scale = tl.load(scale_ptr + head)
    row_ok = (rows < q_len) & (rows < n_queries)
    q = tl.load(q_ptr + head * sq_h + rows[:, None] * sq_n + dims[None, :] * sq_d,
                mask=row_ok[:, None] & (dims[None, :] < dim), other=0.0)
    if CAUSAL:
        q_pos = tl.load(qpos_ptr + head * sqp_h + rows * sqp_n, mask=row_ok, other=0)
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, k_len, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        col_ok = cols < k_len
        k = tl.load(k_ptr + head * sk_h + cols[:, None] * sk_t + dims[None, :] * sk_d,
                    mask=col_ok[:, None] & (dims[None, :] < dim), other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_BIAS:
            logits += tl.load(bias_ptr + head * sb_h + cols * sb_t, mask=col_ok, other=0.0)[None, :]
        visible = row_ok[:, None] & col_ok[None, :] & (logits == logits)
        if CAUSAL:
            k_pos = tl.load(kpos_ptr + head * skp_h + cols * skp_t, mask=col_ok, other=0)
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(logits - safe_max[:, None]), axis=1)
        run_max = new_max
    # run_sum >= 1 whenever a key is visible (its max term is exp(0)); the floor only silences log(0).
    lse = tl.where(run_sum > 0, run_max + tl.log(tl.maximum(run_sum, 1.0)), float("-inf"))
    lse = tl.where(lse == lse, lse, float("-inf"))
    tl.store(lse_ptr + head * sl_h + rows * sl_n, lse, mask=rows < n_queries)


def _score_pass(
    q_ptr, k_ptr, bias_ptr, qpos_ptr, kpos_ptr, qlen_ptr, klen_ptr, scale_ptr, lse_ptr, acc_ptr,
    n_queries, n_keys, dim,
    sq_h, sq_n, sq_d, sk_h, sk_t, sk_d, sb_h, sb_t, sqp_h, sqp_n, skp_h, skp_t, sl_h, sl_n,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2: for a block of keys, reduce A_ij = exp(logit_ij - lse_i) over all queries (sum A^2, sum A, max A)."""
    head = tl.program_id(0).to(tl.int64)  # offsets of later heads can pass 2^31
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    q_len = tl.load(qlen_ptr + head)
    k_len = tl.load(klen_ptr + head)
    scale = tl.load(scale_ptr + head)
    col_ok = (cols < k_len) & (cols < n_keys)
    k = tl.load(k_ptr + head * sk_h + cols[:, None] * sk_t + dims[None, :] * sk_d,
                mask=col_ok[:, None] & (dims[None, :] < dim), other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + head * sb_h + cols * sb_t, mask=col_ok, other=0.0)
    if CAUSAL:
        k_pos = tl.load(kpos_ptr + head * skp_h + cols * skp_t, mask=col_ok, other=0)
    acc = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, q_len, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < q_len
        q = tl.load(q_ptr + head * sq_h + rows[:, None] * sq_n + dims[None, :] * sq_d,
                    mask=row_ok[:, None] & (dims[None, :] < dim), other=0.0)
        # Blind or invalid rows get lse = +inf, so every A_ij of theirs is exp(-inf) = 0.
        lse = tl.load(lse_ptr + head * sl_h + rows * sl_n, mask=row_ok, other=float("-inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if HAS_BIAS:
            logits += bias[None, :]
        visible = row_ok[:, None] & col_ok[None, :] & (logits == logits)
        if CAUSAL:
            q_pos = tl.load(qpos_ptr + head * sqp_h + rows * sqp_n, mask=row_ok, other=0)
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        probs = tl.exp(tl.where(visible, logits, float("-inf")) - lse[:, None])
        if REDUCE == "rms":
            acc += tl.sum(probs * probs, axis=0)
        elif REDUCE == "mean":
            acc += tl.sum(probs, axis=0)
        else:
            acc = tl.maximum(acc, tl.max(probs, axis=0))
    tl.store(acc_ptr + head * n_keys + cols, acc, mask=cols < n_keys)


def key_scores_triton(
    queries: Tensor,
    keys: Tensor,
    scale: float | Tensor,
    *,
    query_len: Tensor | None = None,
    key_len: Tensor | None = None,
    key_bias: Tensor | None = None,
    query_pos: Tensor | None = None,
    key_pos: Tensor | None = None,
    reduce: str = "rms",
) -> KeyScores:
    """Triton implementation: two streaming passes over T, never materialising the N x T matrix."""
    _check_args(queries, keys, query_pos, key_pos, reduce)
    heads, n_queries, dim = queries.shape
    n_keys = keys.shape[1]
    device = keys.device
    dtype = torch.promote_types(queries.dtype, keys.dtype)
    queries, keys = interpreter_safe(queries.to(dtype)), interpreter_safe(keys.to(dtype))
    dtype = queries.dtype
    q_len = _lengths(query_len, heads, n_queries, device)
    k_len = _lengths(key_len, heads, n_keys, device)
    scale_h = _scale_per_head(scale, heads, device)
    causal = query_pos is not None
    bias = key_bias.to(device=device, dtype=torch.float32) if key_bias is not None else scale_h[:, None]
    q_pos = query_pos.to(device=device, dtype=torch.int64) if causal else q_len[:, None]
    k_pos = key_pos.to(device=device, dtype=torch.int64) if causal else k_len[:, None]
    lse = torch.empty(heads, n_queries, dtype=torch.float32, device=device)
    accum = torch.empty(heads, n_keys, dtype=torch.float32, device=device)
    block_d = max(16, next_power_of_2(dim))
    # fp32 operands go through FMA dots (exact products): 64x64 tiles of them spill registers.
    block_n, block_t = (64, 64) if block_d <= 128 and dtype != torch.float32 else (32, 32)
    shared = (
        queries, keys, bias, q_pos, k_pos, q_len, k_len, scale_h, lse,
    )
    sizes_and_strides = (
        n_queries, n_keys, dim, *queries.stride(), *keys.stride(), *bias.stride(), *q_pos.stride(),
        *k_pos.stride(), *lse.stride(),
    )
    flags = dict(HAS_BIAS=key_bias is not None, CAUSAL=causal, PRECISION=dot_precision(dtype),
                 BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d)
    if n_queries > 0:
        jit(_lse_pass)[(heads, cdiv(n_queries, block_n))](*shared, *sizes_and_strides, **flags)
    if n_keys > 0:
        jit(_score_pass)[(heads, cdiv(n_keys, block_t))](
            *shared, accum, *sizes_and_strides, REDUCE=reduce, **flags
        )
    seen = torch.isfinite(lse).sum(dim=1).float()
    return KeyScores(scores=_finish_reduction(accum, seen, reduce), lse=lse)


def _lengths(length: Tensor | None, heads: int, size: int, device: torch.device) -> Tensor:
    """Per-head valid lengths, clamped to the padded size (int64, contiguous)."""
    if length is None:
        return torch.full((heads,), size, dtype=torch.int64, device=device)
    return length.to(device=device, dtype=torch.int64).clamp(0, size).contiguous()

