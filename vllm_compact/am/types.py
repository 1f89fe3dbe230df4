"""Input and output containers of a batched compaction call: what every method in am/methods.py takes and returns.

A batch holds any mix of (layer, KV head, request) spans, padded along T (keys), N (queries) and t (entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def length_mask(length: Tensor | None, heads: int, size: int, device: torch.device) -> Tensor:
    """[heads, size] bool: position < length (all True when length is None)."""
    if length is None:
        return torch.ones(heads, size, dtype=torch.bool, device=device)
    return torch.arange(size, device=device)[None, :] < length.to(device=device, dtype=torch.int64)[:, None]


@dataclass
class HeadBatch:
    keys: Tensor  # [H,T,D] padded, model dtype (post-RoPE, as stored in the cache)
    values: Tensor  # [H,T,D]
    queries: Tensor  # [H,N,D] padded reference queries (GQA group pooled per KV head)
    scale: float | Tensor  # softmax scale, scalar or [H]
    budget: Tensor  # [H] int64, number of compact entries per head (1 <= budget <= key_len)
    key_len: Tensor | None = None  # [H] int64 valid keys (None = T)
    query_len: Tensor | None = None  # [H] int64 valid queries (None = N)
    key_bias: Tensor | None = None  # [H,T] fp32 existing beta (re-compaction)
    query_pos: Tensor | None = None  # [H,N] int64 } causal mask for the span's own queries
    key_pos: Tensor | None = None  # [H,T] int64 }
    content_keys: Tensor | None = None  # [H,T,D] the keys with RoPE undone (am.rotary), for position-free scores

    @property
    def num_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def key_lengths(self) -> Tensor:
        """[H] int64 valid keys per head."""
        if self.key_len is None:
            return torch.full((self.num_heads,), self.keys.shape[1], dtype=torch.int64, device=self.device)
        return self.key_len.to(device=self.device, dtype=torch.int64)

    def budget_per_head(self) -> Tensor:
        return self.budget.to(device=self.device, dtype=torch.int64)

    def key_valid(self) -> Tensor:
        return length_mask(self.key_len, self.num_heads, self.keys.shape[1], self.device)

    def query_valid(self) -> Tensor:
        return length_mask(self.query_len, self.num_heads, self.queries.shape[1], self.device)

    def scale_per_head(self) -> Tensor:
        """[H] fp32 softmax scale."""
        if isinstance(self.scale, Tensor):
            return self.scale.to(device=self.device, dtype=torch.float32).reshape(-1).expand(self.num_heads)
        return torch.full((self.num_heads,), float(self.scale), dtype=torch.float32, device=self.device)

    def bias_or_zero(self) -> Tensor:
        """[H,T] fp32 existing beta, 0 where there is none (padding included)."""
        if self.key_bias is None:
            return torch.zeros(self.keys.shape[:2], dtype=torch.float32, device=self.device)
        return torch.where(self.key_valid(), self.key_bias.to(device=self.device, dtype=torch.float32), 0.0)

    def validate(self, check_budget: bool = True) -> None:
        """Raise ValueError on shapes (and, unless told otherwise, budgets) outside the contract."""
        heads, n_keys, dim = self.keys.shape
        if self.values.shape != self.keys.shape:
            raise ValueError(f"values {tuple(self.values.shape)} must match keys {tuple(self.keys.shape)}")
        if self.queries.dim() != 3 or self.queries.shape[0] != heads or self.queries.shape[2] != dim:
            raise ValueError(f"queries {tuple(self.queries.shape)} must be [H,N,D] with H={heads}, D={dim}")
        if self.content_keys is not None and self.content_keys.shape != self.keys.shape:
            raise ValueError(f"content_keys {tuple(self.content_keys.shape)} must match keys {tuple(self.keys.shape)}")
        if (self.query_pos is None) != (self.key_pos is None):
            raise ValueError("query_pos and key_pos must be given together")
        if self.budget.shape != (heads,):
            raise ValueError(f"budget must be [H]={heads}, got {tuple(self.budget.shape)}")
        key_len = self.key_lengths()
        if bool(((key_len < 1) | (key_len > n_keys)).any()):
            raise ValueError("key_len must lie in [1, T]")
        budget = self.budget_per_head()
        if check_budget and bool(((budget < 1) | (budget > key_len)).any()):
            raise ValueError("budget must lie in [1, key_len] for every head")

    def select_heads(self, heads: Tensor | slice) -> HeadBatch:
        """The sub-batch of the given heads (index tensor or slice)."""

        def pick(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[heads]

        scale = self.scale_per_head()[heads] if isinstance(self.scale, Tensor) else self.scale
        return HeadBatch(
            keys=self.keys[heads],
            values=self.values[heads],
            queries=self.queries[heads],
            scale=scale,
            budget=self.budget[heads],
            key_len=pick(self.key_len),
            query_len=pick(self.query_len),
            key_bias=pick(self.key_bias),
            query_pos=pick(self.query_pos),
            key_pos=pick(self.key_pos),
            content_keys=pick(self.content_keys),
        )


@dataclass
class CompactedHeads:
    indices: Tensor  # [H,tmax] int64 selected positions into T (-1 padding past length)
    keys: Tensor  # [H,tmax,D] C1 = keys[indices], model dtype
    beta: Tensor  # [H,tmax] fp32 (0 for eviction methods; -inf at padding)
    values: Tensor  # [H,tmax,D] C2, model dtype
    length: Tensor  # [H] int64 (= budget)
    fell_back: Tensor  # [H] bool: the head was solved by the eviction fallback (NaN, singular, worse held-out)

    def head(self, h: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Unpadded (indices, keys, beta, values) of head h."""
        n = int(self.length[h])
        return self.indices[h, :n], self.keys[h, :n], self.beta[h, :n], self.values[h, :n]

    @property
    def max_length(self) -> int:
        return self.indices.shape[1]

    def padded_to(self, tmax: int) -> CompactedHeads:
        """The same heads padded along t to `tmax` entries (indices -1, beta -inf, keys/values 0)."""
        extra = tmax - self.max_length
        if extra < 0:
            raise ValueError(f"cannot pad {self.max_length} entries down to {tmax}")
        if extra == 0:
            return self
        heads, _, dim = self.keys.shape
        device = self.keys.device

        def grow(tensor: Tensor, fill: float) -> Tensor:
            pad = torch.full((heads, extra, *tensor.shape[2:]), fill, dtype=tensor.dtype, device=device)
            return torch.cat([tensor, pad], dim=1)

        return CompactedHeads(
            indices=grow(self.indices, -1),
            keys=grow(self.keys, 0.0),
            beta=grow(self.beta, float("-inf")),
            values=grow(self.values, 0.0),
            length=self.length,
            fell_back=self.fell_back,
        )

    def with_heads_replaced(self, heads: Tensor, other: CompactedHeads) -> CompactedHeads:
        """A copy where the rows `heads` (index tensor) come from `other` (one row per index)."""
        tmax = max(self.max_length, other.max_length)
        base = self.padded_to(tmax)
        other = other.padded_to(tmax)
        out = CompactedHeads(*(field.clone() for field in base.fields()))
        out.indices[heads] = other.indices
        out.keys[heads] = other.keys
        out.beta[heads] = other.beta
        out.values[heads] = other.values
        out.length[heads] = other.length
        out.fell_back[heads] = other.fell_back
        return out

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.indices, self.keys, self.beta, self.values, self.length, self.fell_back


def concat_heads(parts: list[CompactedHeads]) -> CompactedHeads:
    """Stack results of consecutive head chunks into one batch (padded to the longest)."""
    tmax = max(part.max_length for part in parts)
    padded = [part.padded_to(tmax) for part in parts]
    return CompactedHeads(*(torch.cat(list(column), dim=0) for column in zip(*(p.fields() for p in padded))))
