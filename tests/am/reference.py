"""Plain float64 references for the AM tests (one head at a time, no code shared with vllm_compact.am)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vllm_compact.am import CompactedHeads, HeadBatch


def attend64(
    queries: Tensor,
    keys: Tensor,
    values: Tensor,
    scale: float,
    bias: Tensor | None = None,
    visible: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One head, float64: softmax(s q.k + bias) V [N,D] and lse [N]; `visible` [N,T] masks pairs out."""
    logits = scale * queries.double() @ keys.double().T
    if bias is not None:
        logits = logits + bias.double()[None, :]
    if visible is not None:
        logits = logits.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(logits, dim=1)
    weights = torch.exp(logits - lse[:, None])
    return weights @ values.double(), lse


def causal_visibility(query_pos: Tensor, key_pos: Tensor) -> Tensor:
    return key_pos[None, :] <= query_pos[:, None]


def head_inputs(batch: HeadBatch, h: int) -> dict[str, Tensor | float | None]:
    """Unpadded tensors of head h of a batch."""
    n_keys = batch.keys.shape[1] if batch.key_len is None else int(batch.key_len[h])
    n_queries = batch.queries.shape[1] if batch.query_len is None else int(batch.query_len[h])
    scale = float(batch.scale[h]) if isinstance(batch.scale, Tensor) else float(batch.scale)
    return {
        "keys": batch.keys[h, :n_keys],
        "values": batch.values[h, :n_keys],
        "queries": batch.queries[h, :n_queries],
        "scale": scale,
        "bias": None if batch.key_bias is None else batch.key_bias[h, :n_keys],
        "query_pos": None if batch.query_pos is None else batch.query_pos[h, :n_queries],
        "key_pos": None if batch.key_pos is None else batch.key_pos[h, :n_keys],
    }


def original_attention(batch: HeadBatch, h: int, queries: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """float64 attention of head h over its full span (its own reference queries unless `queries` is given)."""
    inp = head_inputs(batch, h)
    q = inp["queries"] if queries is None else queries
    visible = None
    if queries is None and inp["query_pos"] is not None:
        visible = causal_visibility(inp["query_pos"], inp["key_pos"])
    return attend64(q, inp["keys"], inp["values"], inp["scale"], inp["bias"], visible)


def compact_attention(
    result: CompactedHeads, batch: HeadBatch, h: int, queries: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """float64 attention of head h over its compact entries (causal with the kept keys' positions if given)."""
    inp = head_inputs(batch, h)
    indices, keys, beta, values = result.head(h)
    q = inp["queries"] if queries is None else queries
    visible = None
    if queries is None and inp["query_pos"] is not None:
        visible = causal_visibility(inp["query_pos"], inp["key_pos"][indices])
    return attend64(q, keys, values, inp["scale"], beta, visible)


def relative_errors(out: Tensor, lse: Tensor, out_ref: Tensor, lse_ref: Tensor) -> tuple[float, float]:
    """(||O - O_ref||_F / ||O_ref||_F, max_i |M_i / M_ref_i - 1|) over rows where the reference sees a key."""
    rows = torch.isfinite(lse_ref)
    output = float((out[rows] - out_ref[rows]).norm() / out_ref[rows].norm().clamp(min=1e-300))
    mass = float(torch.expm1(lse[rows] - lse_ref[rows]).abs().max()) if bool(rows.any()) else 0.0
    return output, mass


def rms_scores64(queries: Tensor, keys: Tensor, scale: float, bias: Tensor | None, reduce: str) -> Tensor:
    """Per-key attention score reduced over queries, float64."""
    logits = scale * queries.double() @ keys.double().T
    if bias is not None:
        logits = logits + bias.double()[None, :]
    probs = torch.softmax(logits, dim=1)
    if reduce == "rms":
        return probs.square().mean(dim=0).sqrt()
    if reduce == "mean":
        return probs.mean(dim=0)
    return probs.amax(dim=0)


def clustered_batch(
    heads: int, n_keys: int, n_queries: int, dim: int, clusters: int, seed: int, budget: int
) -> HeadBatch:
    """Keys drawn around a few centres (so a few keys can stand for many); queries random, moderately sharp."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(heads, clusters, dim, generator=gen) * 1.5
    assign = torch.randint(0, clusters, (heads, n_keys), generator=gen)
    keys = torch.gather(centres, 1, assign[:, :, None].expand(-1, -1, dim)) + 0.3 * torch.randn(
        heads, n_keys, dim, generator=gen
    )
    values = torch.randn(heads, n_keys, dim, generator=gen)
    queries = torch.randn(heads, n_queries, dim, generator=gen)
    return HeadBatch(
        keys=keys,
        values=values,
        queries=queries,
        scale=dim**-0.5,
        budget=torch.full((heads,), budget, dtype=torch.int64),
    )
