"""The engine's logits with compact segments match an independent plain-torch reference.

The reference replays the engine's timeline: tokens computed before a compaction attend to the full cache; at the
compaction point the cache becomes [protected head ; compact entries with beta (taken from the engine's pages) ;
uncompacted tail], and later tokens (rest of a chunked prefill, then decode) attend to that, at their logical
positions. GQA (tiny: 8 query / 2 KV heads), several requests in one batch (one never compacted), per-head
budgets of different lengths, re-compaction.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.conftest import run_scenario
from tests.reference_llama import LayerCache, ReferenceLlama, compact_layer_cache

BLOCK = 32


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def _head_table(path, num_layers: int, num_kv_heads: int) -> str:
    g = torch.Generator().manual_seed(1)
    table = (torch.rand(num_layers, num_kv_heads, generator=g) * 3 + 0.2).tolist()
    path.write_text(json.dumps({"proportions": table}))
    return str(path)


def _scenario(tiny_model_path: str, tmp, dtype: str = "float32", compaction: bool = True) -> dict:
    cfg = json.load(open(f"{tiny_model_path}/config.json"))
    return {
        "model": tiny_model_path,
        "compaction": None if not compaction else {
            "trigger_tokens": 64,
            "recent_window_tokens": 32,
            "protected_initial_tokens": 1,
            "ratio": 4,
            "compact_during_prefill": True,  # the replay covers tokens prefilled over a compact segment
            "head_budget_file": _head_table(tmp / "heads.json", cfg["num_hidden_layers"], cfg["num_key_value_heads"]),
        },
        "engine": {"block_size": BLOCK, "max_num_batched_tokens": 128, "max_model_len": 1024, "dtype": dtype},
        "requests": [
            {"id": "long", "prompt_token_ids": _prompt(330, 0), "max_tokens": 40, "logprobs": 5, "prompt_logprobs": 1},
            {"id": "mid", "prompt_token_ids": _prompt(200, 1), "max_tokens": 12, "logprobs": 5, "prompt_logprobs": 1},
            {"id": "short", "prompt_token_ids": _prompt(40, 2), "max_tokens": 12, "logprobs": 5, "prompt_logprobs": 1},
        ],
    }


@pytest.fixture(scope="module")
def compacted_run(tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    return run_scenario(_scenario(tiny_model_path, tmp), tmp)


@pytest.fixture(scope="module")
def bf16_runs(tiny_model_path, tmp_path_factory):
    """The served dtype: the same requests through a bf16 engine, with compaction and stock."""
    tmp = tmp_path_factory.mktemp("ref-bf16")
    return (run_scenario(_scenario(tiny_model_path, tmp, "bfloat16"), tmp / "compacted"),
            run_scenario(_scenario(tiny_model_path, tmp, "bfloat16", compaction=False), tmp / "stock"))


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, torch_dtype=torch.float32, attn_implementation="eager")
    return ReferenceLlama(model)


def _replay(ref: ReferenceLlama, record: dict, compacted: bool) -> torch.Tensor:
    """Reference log-probs [len(tokens)-1, vocab] at every position, following the engine's compactions."""
    tokens = record["prompt_token_ids"] + record["token_ids"]
    cache = ref.new_cache()
    # Logical position of each cache column, per layer (-1: compact entry; layers pad to different widths).
    positions_of_cache: list[list[int]] = [[] for _ in cache]
    logits = []
    pos = 0
    events = record["events"] if compacted else []
    for event in events:
        upto = event["computed_before"]
        logits.append(ref.forward(tokens[pos:upto], list(range(pos, upto)), cache))
        pos = upto
        head_end, tail_start = event["start_block"] * BLOCK, event["end_block"] * BLOCK
        for layer, entries in enumerate(event["layers"]):
            cols = torch.tensor(positions_of_cache[layer] + list(range(upto - (cache[layer].keys.shape[1] - len(positions_of_cache[layer])), upto)))
            head_cols = ((cols >= 0) & (cols < head_end)).nonzero().flatten()
            tail_cols = (cols >= tail_start).nonzero().flatten()
            c = cache[layer]
            pick = lambda idx: LayerCache(c.keys[:, idx], c.values[:, idx], c.bias[:, idx])  # noqa: E731
            compact = compact_layer_cache(entries)
            cache[layer] = LayerCache.cat([pick(head_cols), compact, pick(tail_cols)])
            positions_of_cache[layer] = (
                cols[head_cols].tolist() + [-1] * compact.keys.shape[1] + cols[tail_cols].tolist()
            )
    logits.append(ref.forward(tokens[pos:-1], list(range(pos, len(tokens) - 1)), cache))
    return torch.log_softmax(torch.cat(logits), -1)


def _engine_points(record: dict) -> list[tuple[int, dict]]:
    """(position whose logits predict the token, {token: engine logprob}) for prompt and generated tokens."""
    points = []
    for i, d in enumerate(record["prompt_logprobs"]):
        if d is not None:
            points.append((i - 1, d))
    n_prompt = len(record["prompt_token_ids"])
    for j, d in enumerate(record["logprobs"]):
        points.append((n_prompt + j - 1, d))
    return points


def test_compaction_fired_as_configured(compacted_run):
    reqs = compacted_run["requests"]
    assert len(reqs["long"]["events"]) >= 2, "the long request must be compacted, then re-compacted"
    assert len(reqs["mid"]["events"]) >= 1
    assert reqs["short"]["events"] == []
    first = reqs["long"]["events"][0]
    assert first["computed_before"] < len(reqs["long"]["prompt_token_ids"]), "first compaction is mid-prefill"
    lengths = {len(k) for layer in first["layers"] for k, _, _ in layer}
    assert len(lengths) > 1, "per-head budgets must give heads different lengths"
    stats = compacted_run["stats"]
    assert stats["free_final"] == stats["free_initial"]


@pytest.mark.parametrize("rid", ["long", "mid", "short"])
def test_engine_logits_match_reference(compacted_run, reference, rid):
    record = compacted_run["requests"][rid]
    ref_logprobs = _replay(reference, record, compacted=True)
    points = _engine_points(record)
    first_compaction = record["events"][0]["computed_before"] if record["events"] else 0
    checked_after = 0
    worst = 0.0
    for position, engine in points:
        for token, logprob in engine.items():
            err = abs(float(ref_logprobs[position, token]) - logprob)
            worst = max(worst, err)
        checked_after += position >= first_compaction
    assert worst < 2e-3, f"{rid}: max |engine - reference| log-prob = {worst}"
    assert checked_after > 10


def test_compact_entries_keep_the_position_their_key_was_rotated_at(compacted_run, reference):
    """Each entry's recorded position is that of the token whose key it holds (positions undo RoPE for key
    distinctiveness): in every layer at the first compaction, which follows a full-context prefill; in layer 0,
    whose keys depend only on the token and its position, at every re-compaction (old entries keep theirs)."""
    record = compacted_run["requests"]["long"]
    tokens = record["prompt_token_ids"] + record["token_ids"]
    full = reference.new_cache()
    reference.forward(tokens, list(range(len(tokens))), full)
    checked = 0
    for number, event in enumerate(record["events"]):
        for layer in range(len(event["layers"]) if number == 0 else 1):
            for head, (keys, _, _) in enumerate(event["layers"][layer]):
                positions = event["positions"][layer][head]
                assert bool((positions < event["end_block"] * BLOCK).all())
                assert torch.allclose(keys.float(), full[layer].keys[head, positions], rtol=1e-3, atol=1e-3)
                checked += len(positions)
    assert len(record["events"]) >= 2 and checked > 100


def test_reference_distinguishes_compaction(compacted_run, reference):
    """Guard: compaction changes the log-probs by far more than the tolerance, so the match above is meaningful."""
    record = compacted_run["requests"]["long"]
    with_compaction = _replay(reference, record, compacted=True)
    without = _replay(reference, record, compacted=False)
    start = record["events"][0]["computed_before"]
    assert float((with_compaction[start:] - without[start:]).abs().max()) > 2e-2


def _errors(ref: ReferenceLlama, record: dict, compacted: bool) -> torch.Tensor:
    ref_logprobs = _replay(ref, record, compacted)
    return torch.tensor([abs(float(ref_logprobs[position, token]) - logprob)
                         for position, engine in _engine_points(record) for token, logprob in engine.items()])


@pytest.mark.parametrize("rid", ["long", "mid"])
def test_bf16_engine_with_compaction_is_as_close_to_the_reference_as_stock_bf16(bf16_runs, reference, rid):
    """A bf16 engine differs from the fp32 reference by bf16 rounding. With compaction firing (the compact entries
    read back from the bf16 pages) it must stay as close as stock bf16 vLLM is on the same requests, while
    compaction itself moves the log-probs by far more."""
    compacted, stock = bf16_runs[0]["requests"][rid], bf16_runs[1]["requests"][rid]
    assert compacted["events"] and not stock["events"]
    err = _errors(reference, compacted, compacted=True)
    stock_err = _errors(reference, stock, compacted=False)
    assert float(err.max()) < 0.15, f"{rid}: max |bf16 engine - reference| log-prob = {float(err.max())}"
    assert float(err.mean()) < 1.5 * float(stock_err.mean()) + 1e-3, (float(err.mean()), float(stock_err.mean()))
    start = compacted["events"][0]["computed_before"]
    moved = (_replay(reference, compacted, True)[start:] - _replay(reference, compacted, False)[start:]).abs()
    assert float(moved.mean()) > 10 * float(err.mean())
