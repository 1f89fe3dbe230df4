"""An independent reference for compacted attention: a plain-torch Llama forward over an explicit cache.

It reuses the HF model's weights and modules (norms, projections, RoPE tables, MLP) but does attention itself, in
float32, over a cache whose entries may carry a per-entry bias (beta for compact entries, 0 for ordinary tokens,
-inf for padding). Positions are passed explicitly, so logical positions can run past the physical cache length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class LayerCache:
    keys: torch.Tensor    # [Hkv, T, D] post-RoPE
    values: torch.Tensor  # [Hkv, T, D]
    bias: torch.Tensor    # [Hkv, T] fp32

    @classmethod
    def empty(cls, num_kv_heads: int, head_dim: int) -> "LayerCache":
        return cls(torch.zeros(num_kv_heads, 0, head_dim), torch.zeros(num_kv_heads, 0, head_dim),
                   torch.zeros(num_kv_heads, 0))

    def slice(self, start: int, end: int) -> "LayerCache":
        return LayerCache(self.keys[:, start:end], self.values[:, start:end], self.bias[:, start:end])

    @staticmethod
    def cat(parts: list["LayerCache"]) -> "LayerCache":
        return LayerCache(torch.cat([p.keys for p in parts], 1), torch.cat([p.values for p in parts], 1),
                          torch.cat([p.bias for p in parts], 1))


def compact_layer_cache(entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> LayerCache:
    """Per-head (keys [t_h, D], values [t_h, D], beta [t_h]) of possibly different lengths -> padded LayerCache."""
    longest = max(k.shape[0] for k, _, _ in entries)
    dim = entries[0][0].shape[1]
    keys = torch.zeros(len(entries), longest, dim)
    values = torch.zeros_like(keys)
    bias = torch.full((len(entries), longest), float("-inf"))
    for h, (k, v, b) in enumerate(entries):
        keys[h, : k.shape[0]], values[h, : k.shape[0]], bias[h, : k.shape[0]] = k.float(), v.float(), b.float()
    return LayerCache(keys, values, bias)


class ReferenceLlama:
    def __init__(self, hf_model) -> None:
        self.model = hf_model.float().eval()
        cfg = hf_model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache.empty(self.num_kv_heads, self.head_dim) for _ in self.model.model.layers]

    def _attention(self, q: torch.Tensor, cache: LayerCache, num_new: int) -> torch.Tensor:
        """q [Hq, n, D] over cache [Hkv, T, D] whose last n entries are the new tokens (causal among them)."""
        group = self.num_heads // self.num_kv_heads
        keys = cache.keys.repeat_interleave(group, 0)
        values = cache.values.repeat_interleave(group, 0)
        bias = cache.bias.repeat_interleave(group, 0)
        total = keys.shape[1]
        logits = q @ keys.transpose(1, 2) * self.scale + bias[:, None, :]
        past = total - num_new
        causal = torch.arange(total)[None, :] > (past + torch.arange(num_new))[:, None]
        logits = logits.masked_fill(causal[None], float("-inf"))
        return torch.softmax(logits, -1) @ values  # [Hq, n, D]

    @torch.no_grad()
    def forward(self, token_ids: list[int], positions: list[int], cache: list[LayerCache]) -> torch.Tensor:
        """Logits [n, vocab] of the new tokens; appends their K/V to `cache` (in place)."""
        m = self.model.model
        ids = torch.tensor([token_ids])
        pos = torch.tensor([positions])
        hidden = m.embed_tokens(ids)
        cos, sin = m.rotary_emb(hidden, pos)
        n = len(token_ids)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(1, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache[i] = LayerCache.cat([cache[i], LayerCache(k[0], v[0], torch.zeros(self.num_kv_heads, n))])
            out = self._attention(q[0], cache[i], n)  # [Hq, n, D]
            out = out.transpose(0, 1).reshape(1, n, self.num_heads * self.head_dim)
            hidden = hidden + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(m.norm(hidden))[0]
