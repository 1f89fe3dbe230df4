"""`vllm-compact bench am` on the tiny model: capture correctness and an end-to-end run into a tmp dir."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vllm_compact.am import CompactedHeads, attention_errors
from vllm_compact.benchmarks import am
from vllm_compact.benchmarks.capture import build_layout, capture, load_model
from vllm_compact.benchmarks.heldout import heldout_errors, heldout_reference
from vllm_compact.data.essays import essay_text
from vllm_compact.models.registry import ensure_model

SPAN, AFTER, HELDOUT, REPEAT = 96, 32, 32, 24


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model(ensure_model("tiny"))
    layout = build_layout(tokenizer, essay_text(), SPAN, AFTER, HELDOUT, REPEAT)
    return model, layout, capture(model, layout, [0, 2])


def _reference_tensors(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE q [Hq,n,D], k and v [Hkv,n,D] of `layer` from one stock forward of `ids` at positions 0..n-1,
    rebuilt from the layer's input hidden states with its own projections."""
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True, use_cache=True)
        attention = model.model.layers[layer].self_attn
        hidden = model.model.layers[layer].input_layernorm(out.hidden_states[layer])
        head_dim = attention.head_dim
        q = attention.q_proj(hidden).view(1, ids.numel(), -1, head_dim).transpose(1, 2)
        k = attention.k_proj(hidden).view(1, ids.numel(), -1, head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(ids.numel())[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cache = out.past_key_values.layers[layer]
    torch.testing.assert_close(cache.keys[0], k[0], rtol=1e-5, atol=1e-5)
    return q[0], cache.keys[0], cache.values[0]


def test_capture_matches_a_stock_forward(tiny):
    model, layout, cap = tiny
    full = torch.cat([layout.span, layout.after, layout.heldout])
    for slot, layer in enumerate([0, 2]):
        q, k, v = _reference_tensors(model, full, layer)
        kv_heads = k.shape[0]
        group = q.shape[0] // kv_heads
        torch.testing.assert_close(cap.keys[slot], k[:, :SPAN], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cap.values[slot], v[:, :SPAN], rtol=1e-5, atol=1e-5)
        # KV head h pools query heads h*G .. h*G+G-1, group-major
        pooled = q.reshape(kv_heads, group, -1, q.shape[-1])
        torch.testing.assert_close(cap.queries["context"][slot], pooled[:, :, :SPAN].flatten(1, 2), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            cap.queries["after"][slot], pooled[:, :, SPAN : SPAN + AFTER].flatten(1, 2), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(
            cap.queries["heldout"][slot], pooled[:, :, SPAN + AFTER :].flatten(1, 2), rtol=1e-4, atol=1e-4
        )
    assert cap.scale == pytest.approx(1 / math.sqrt(model.config.head_dim))
    assert cap.queries["repeat"].shape[2] == cap.group_size * REPEAT
    assert cap.query_positions["heldout"][:HELDOUT].tolist() == list(range(SPAN + AFTER, SPAN + AFTER + HELDOUT))
    first_repeat = SPAN + layout.instruction_tokens
    assert cap.query_positions["repeat"][:REPEAT].tolist() == list(range(first_repeat, first_repeat + REPEAT))


def test_repeat_queries_match_a_stock_forward_of_the_whole_sequence(tiny):
    model, layout, cap = tiny
    q, _, _ = _reference_tensors(model, torch.cat([layout.span, layout.repeat]), 2)
    kv_heads = cap.keys.shape[1]
    pooled = q.reshape(kv_heads, cap.group_size, -1, q.shape[-1])
    repeated = pooled[:, :, SPAN + layout.instruction_tokens :]
    torch.testing.assert_close(cap.queries["repeat"][1], repeated.flatten(1, 2), rtol=1e-4, atol=1e-4)


def test_cached_heldout_errors_equal_attention_errors():
    generator = torch.Generator().manual_seed(0)
    heads, span, n_queries, dim, kept = 5, 64, 20, 16, 9
    keys = torch.randn(heads, span, dim, generator=generator)
    values = torch.randn(heads, span, dim, generator=generator)
    queries = torch.randn(heads, n_queries, dim, generator=generator) * 2
    indices = torch.stack([torch.randperm(span, generator=generator)[:kept] for _ in range(heads)])
    length = torch.tensor([9, 3, 9, 1, 5])
    beta = torch.randn(heads, kept, generator=generator)
    compacted = CompactedHeads(
        indices=indices,
        keys=torch.gather(keys, 1, indices[:, :, None].expand(-1, -1, dim)),
        beta=beta,
        values=torch.randn(heads, kept, dim, generator=generator),
        length=length,
        fell_back=torch.zeros(heads, dtype=torch.bool),
    )
    ours = heldout_errors(heldout_reference(keys, values, queries, 0.25), compacted)
    theirs = attention_errors(keys, values, None, None, compacted, queries, None, 0.25)
    for key in ("output_rel_err", "mass_rel_err"):
        torch.testing.assert_close(ours[key], theirs[key].double(), rtol=1e-9, atol=1e-12)


def test_bench_am_end_to_end(tmp_path):
    out = tmp_path / "am.json"
    argv = ["--model", "tiny", "--span-tokens", "256", "--after-tokens", "64", "--heldout-tokens", "64",
            "--repeat-tokens", "64", "--layers", "0", "1", "--ratios", "10", "20", "--methods", "none", "snapkv",
            "am-highest-attention", "--queries", "after", "context-causal", "--prefill-engine", "transformers",
            "--out", str(out)]
    assert am.main(argv) == 0
    document = json.loads(out.read_text())
    rows = document["rows"]
    assert len(rows) == 2 * (1 + 2 + 2)  # `none` once per source (ratio 1)
    keys = {"method", "ratio", "queries", "output_rel_err", "mass_rel_err", "compact_seconds", "prefill_seconds"}
    for row in rows:
        assert keys <= row.keys()
        assert all(math.isfinite(row[key]) for key in keys - {"method", "queries"})
    for row in (r for r in rows if r["method"] == "none"):
        assert row["output_rel_err"] < 1e-9 and row["mass_rel_err"] < 1e-9
    for row in (r for r in rows if r["method"] != "none"):
        assert row["output_rel_err"] > 1e-6  # 256 keys kept as 26 or 13 entries cannot be exact
        assert row["compact_entries"] == 2 * 2 * round(256 / row["ratio"])
    check = document["meta"]["metric_cross_check"]
    assert check["max_abs_diff_output_rel_err"] < 1e-9 and check["max_abs_diff_mass_rel_err"] < 1e-9
    assert len(document["targets"]) == 3 and all(isinstance(t["passed"], bool) for t in document["targets"])
    markdown = out.with_suffix(".md").read_text()
    assert "queries = after" in markdown and "queries = context-causal" in markdown
    assert "am-highest-attention" in markdown and ("PASS" in markdown or "FAIL" in markdown)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
