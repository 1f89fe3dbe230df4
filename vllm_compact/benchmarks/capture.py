"""Capture real attention tensors (post-RoPE keys, values and queries) from a transformers Llama-style model.

The capture hooks the model's attention *function* through transformers' `AttentionInterface` registry: the
registered function records what it receives (queries and keys are post-RoPE there, keys/values include the
cache) and then delegates to the stock SDPA attention, so the model computes exactly what it normally does.

Token layout of one capture: [span][after][held-out], prefilled causally, plus a separate "repeat-prefill"
forward on top of the span's cache: [instruction][span tokens again] (teacher-forced, positions continue).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_ATTENTION = "vllm_compact_capture"
REPEAT_INSTRUCTION = "\n\nRepeat the previous context verbatim.\n\n"


@dataclass
class TokenLayout:
    """Token ids of one benchmark context."""

    span: torch.Tensor  # [T] int64
    after: torch.Tensor  # [A]
    heldout: torch.Tensor  # [Ho]
    repeat: torch.Tensor  # [I + R] instruction + the span's first R tokens again
    instruction_tokens: int  # I: the repeat forward's leading instruction tokens


@dataclass
class CapturedTensors:
    """Per captured layer: the span's cache and the pooled queries of every source (fp32, CPU).

    Queries are pooled per KV head over its GQA group: [L, Hkv, G*n, D], group-major (query head g of the
    group covers rows g*n .. (g+1)*n-1). `query_positions[name]` is the matching [G*n] absolute position.
    """

    layers: list[int]
    keys: torch.Tensor  # [L, Hkv, T, D]
    values: torch.Tensor  # [L, Hkv, T, D]
    queries: dict[str, torch.Tensor] = field(default_factory=dict)
    query_positions: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: float = 1.0
    group_size: int = 1
    seconds: float = 0.0

    @property
    def span_tokens(self) -> int:
        return int(self.keys.shape[2])


class AttentionRecorder:
    """Records (query, key, value) per layer index while `active`; pass-through otherwise."""

    def __init__(self, layers: set[int]) -> None:
        self.layers = layers
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.scale: float | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = int(module.layer_idx)
        if layer in self.layers:
            # batch 1: [1, H, n, D] -> [H, n, D]; clone because the cache may grow in place later
            self.records[layer] = (query[0].detach().clone(), key[0].detach().clone(), value[0].detach().clone())
            self.scale = float(scaling if scaling is not None else module.scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    def take(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        records, self.records = self.records, {}
        return records


def register_recorder(recorder: AttentionRecorder) -> None:
    ALL_ATTENTION_FUNCTIONS.register(CAPTURE_ATTENTION, recorder)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_ATTENTION, sdpa_mask)


def load_model(model_dir: Path) -> tuple[torch.nn.Module, object]:
    """fp32 CPU model (sdpa attention until capture switches it) and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return model, tokenizer


def config_rotary(config, max_positions: int):
    """The plain RoPE of a transformers Llama-style config (the registry's models have no rope scaling)."""
    from vllm_compact.am.rotary import Rotary

    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"plain RoPE only, not {rope}")
    theta = rope.get("rope_theta") or config.rope_theta
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))
    return Rotary.from_theta(theta, rotary_dim, max_positions)


def build_layout(tokenizer, text: str, span: int, after: int, heldout: int, repeat: int) -> TokenLayout:
    """Tokenize enough of `text` for span + after + held-out; the repeat part reuses the span's own ids."""
    needed = span + after + heldout
    chars = needed * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= needed or chars >= len(text):
            break
        chars *= 2
    if len(ids) < needed:
        raise ValueError(f"text has {len(ids)} tokens, the layout needs {needed}")
    ids = torch.tensor(ids[:needed], dtype=torch.long)
    instruction = torch.tensor(tokenizer(REPEAT_INSTRUCTION, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return TokenLayout(
        span=ids[:span],
        after=ids[span : span + after],
        heldout=ids[span + after :],
        repeat=torch.cat([instruction, ids[: min(repeat, span)]]),
        instruction_tokens=instruction.numel(),
    )


def pool_group(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[Hq, n, D] -> [Hkv, G*n, D]: query head j belongs to KV head j // G (transformers' repeat_kv order)."""
    hq, n, d = query.shape
    group = hq // num_kv_heads
    return query.reshape(num_kv_heads, group * n, d)


def _forward(model, ids: torch.Tensor, start: int, cache) -> object:
    positions = torch.arange(start, start + ids.numel()).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=ids.unsqueeze(0), position_ids=positions, past_key_values=cache, use_cache=True)
    return out.past_key_values


def capture(model, layout: TokenLayout, layers: list[int]) -> CapturedTensors:
    """Three forwards: span (keys, values, context queries); after+held-out on the span's cache; repeat on a copy."""
    started = time.perf_counter()
    recorder = AttentionRecorder(set(layers))
    register_recorder(recorder)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTENTION)
    try:
        span_len = layout.span.numel()
        cache = _forward(model, layout.span, 0, None)
        span_records = recorder.take()
        _forward(model, layout.repeat, span_len, copy.deepcopy(cache))
        repeat_records = recorder.take()
        _forward(model, torch.cat([layout.after, layout.heldout]), span_len, cache)
        later_records = recorder.take()
    finally:
        model.set_attn_implementation(previous)

    num_kv = span_records[layers[0]][1].shape[0]
    group = span_records[layers[0]][0].shape[0] // num_kv
    n_after = layout.after.numel()
    n_instruction = layout.instruction_tokens
    sources = {
        "context": lambda layer: span_records[layer][0],
        "after": lambda layer: later_records[layer][0][:, :n_after],
        "heldout": lambda layer: later_records[layer][0][:, n_after:],
        # queries of the repeated span text only (the instruction's few tokens are not the span's)
        "repeat": lambda layer: repeat_records[layer][0][:, n_instruction:],
    }
    first = {
        "context": 0,
        "after": span_len,
        "heldout": span_len + n_after,
        "repeat": span_len + n_instruction,
    }
    queries = {
        name: torch.stack([pool_group(pick(layer), num_kv) for layer in layers]) for name, pick in sources.items()
    }
    positions = {
        name: (torch.arange(queries[name].shape[2] // group) + first[name]).repeat(group) for name in sources
    }
    return CapturedTensors(
        layers=list(layers),
        keys=torch.stack([span_records[layer][1] for layer in layers]),
        values=torch.stack([span_records[layer][2] for layer in layers]),
        queries=queries,
        query_positions=positions,
        scale=float(recorder.scale),
        group_size=group,
        seconds=time.perf_counter() - started,
    )
