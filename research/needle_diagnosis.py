"""`python -m research.needle_diagnosis`: where a needle's tokens go when the engine compacts its prompt.

An offline replica at full context (transformers, post-RoPE queries and keys captured as the model computes them)
of one engine compaction with the question at the end of the prompt: the span is what the engine compacts (after
the protected head block, before the recent window, whole blocks), and the reference queries are the reservoir's
(the prompt's last `recent` tokens, the question among them). Per (layer, KV head) it measures
- `answer_mass`: attention mass the queries that WRITE the answer (teacher-forced) put on the needle's value tokens,
- `question_mass`: the same for the reservoir's queries (what selection sees),
- `kept`: the share of the needle's value tokens each method keeps, fitted on the reservoir, and on the answer's own
  queries (an oracle no engine has), at the given ratio and uniform budgets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vllm_compact.benchmarks.results import ResultsFile, command_line
from vllm_compact.benchmarks.specs import parse_spec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m research.needle_diagnosis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=2000, help="prompt tokens")
    p.add_argument("--depths", type=int, default=5)
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--methods", nargs="+", default=["snapkv", "am-highest-attention"],
                   help="methods, optionally with options: METHOD[:OPTION=VALUE...] (e.g. snapkv:follow_tokens=16)")
    p.add_argument("--block", type=int, default=128, help="KV block size (vLLM CPU default)")
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--top-heads", type=int, default=10, help="heads reported: those with the most answer_mass")
    p.add_argument("--out", default="research/results/needle_diagnosis.json")
    return p


def find_subsequence(haystack: list[int], needle: list[int]) -> int:
    for i in range(len(haystack) - len(needle), -1, -1):
        if haystack[i : i + len(needle)] == needle:
            return i
    raise ValueError("needle tokens not found in the prompt")


def _mass(queries, keys, positions, scale, query_pos):
    """[Hkv] mean over queries of the causal softmax mass on key `positions` (queries pooled per KV head)."""
    import torch

    logits = torch.einsum("hnd,htd->hnt", queries, keys) * scale
    hidden = torch.arange(keys.shape[1])[None, None, :] > query_pos[None, :, None]
    probs = logits.masked_fill(hidden, float("-inf")).softmax(-1)
    return probs[:, :, positions].sum(-1).mean(-1)


def diagnose_prompt(model, tokenizer, needle, args) -> list[dict]:
    import torch

    from vllm_compact.am import HeadBatch, compact_heads, uniform_budgets
    from vllm_compact.benchmarks.capture import CAPTURE_ATTENTION, AttentionRecorder, pool_group, register_recorder

    prompt = tokenizer.encode(needle.prompt, add_special_tokens=False)
    answer = tokenizer.encode(" " + needle.answer, add_special_tokens=False)
    value_tokens = tokenizer.encode(needle.answer, add_special_tokens=False)
    value_start = find_subsequence(prompt, value_tokens)
    value_pos = torch.arange(value_start, value_start + len(value_tokens))
    ids = torch.tensor(prompt + answer)
    layers = list(range(model.config.num_hidden_layers))
    recorder = AttentionRecorder(set(layers))
    register_recorder(recorder)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTENTION)
    try:
        with torch.no_grad():
            model(input_ids=ids[None], use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    records = recorder.take()
    n_prompt = len(prompt)
    span = slice(args.block, (n_prompt - args.recent) // args.block * args.block)  # what the engine compacts
    in_span = value_pos[(value_pos >= span.start) & (value_pos < span.stop)] - span.start
    reservoir = torch.arange(n_prompt - args.recent, n_prompt)
    writers = torch.arange(n_prompt - 1, n_prompt + len(answer) - 1)  # each predicts the next answer token
    rows = []
    keys_all, vals, q_res, q_ans, ans_mass, q_mass = [], [], [], [], [], []
    for layer in layers:
        q, k, v = records[layer]
        num_kv = k.shape[0]
        group = q.shape[0] // num_kv
        pooled = lambda pos: pool_group(q[:, pos], num_kv)  # noqa: E731
        res, ans = pooled(reservoir), pooled(writers)
        ans_mass.append(_mass(ans, k, value_pos, recorder.scale, writers.repeat(group)))
        q_mass.append(_mass(res, k, value_pos, recorder.scale, reservoir.repeat(group)))
        keys_all.append(k[:, span])
        vals.append(v[:, span])
        q_res.append(res)
        q_ans.append(ans)
    keys, values = torch.cat(keys_all), torch.cat(vals)
    key_len = torch.full((keys.shape[0],), keys.shape[1])
    budget = uniform_budgets(key_len, args.ratio)
    kept = {}
    for method in args.methods:
        for source, queries in (("reservoir", torch.cat(q_res)), ("answer", torch.cat(q_ans))):
            spec = parse_spec(method, ratio_required=False)
            result = compact_heads(HeadBatch(keys=keys, values=values, queries=queries, scale=recorder.scale,
                                             budget=budget, key_len=key_len), spec.method, **spec.options)
            kept[(method, source)] = torch.stack(
                [torch.isin(in_span, result.indices[h]).float().mean() for h in range(keys.shape[0])])
    ans_mass, q_mass = torch.cat(ans_mass), torch.cat(q_mass)
    num_kv = records[0][1].shape[0]
    for head in ans_mass.argsort(descending=True)[: args.top_heads].tolist():
        rows.append({"depth": round(needle.depth, 2), "layer": head // num_kv, "kv_head": head % num_kv,
                     "answer_mass": float(ans_mass[head]), "question_mass": float(q_mass[head]),
                     **{f"kept_{m}_{s}": float(v[head]) for (m, s), v in kept.items()}})
    summary = {"depth": round(needle.depth, 2), "needle_in_span": bool(in_span.numel()),
               **{f"kept_{m}_{s}": float((v * ans_mass).sum() / ans_mass.sum()) for (m, s), v in kept.items()}}
    return rows, summary


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import torch

    from vllm_compact.benchmarks.capture import load_model
    from vllm_compact.data.needle import make_needle_prompt, needle_depths
    from vllm_compact.server.serve import resolve_model

    torch.manual_seed(0)
    model, tokenizer = load_model(Path(resolve_model(args.model)))
    heads, summaries = [], []
    for i, depth in enumerate(needle_depths(args.depths)):
        needle = make_needle_prompt(tokenizer, args.context, depth, "number", seed=i)
        rows, summary = diagnose_prompt(model, tokenizer, needle, args)
        heads += rows
        summaries.append(summary)
    command = command_line("python", "-m", "research.needle_diagnosis", *argv)
    keys = [k for k in summaries[0] if k.startswith("kept_")]
    lines = ["# Where the needle goes (offline replica of one engine compaction, question at the end)", "",
             f"Command: `{command}`; "
             f"model {args.model}, block {args.block}, recent window {args.recent}, uniform budgets.", "",
             "Share of the needle's value tokens kept, weighted over heads by the attention mass the answer's "
             "writing queries put on them (1 = every head the answer reads keeps every digit):", "",
             "| depth | needle in span | " + " | ".join(k.removeprefix("kept_") for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for s in summaries:
        lines.append(f"| {s['depth']} | {s['needle_in_span']} | " + " | ".join(f"{s[k]:.2f}" for k in keys) + " |")
    lines += ["", f"Top {args.top_heads} heads by answer mass per prompt (mass of the answer's queries vs the "
              "reservoir's on the needle's value tokens, and the share each selection keeps):", "",
              "| depth | layer | kv head | answer mass | question mass | " + " | ".join(k.removeprefix("kept_") for k in keys) + " |",
              "|---|---|---|---|---|" + "---|" * len(keys)]
    for r in heads:
        lines.append(f"| {r['depth']} | {r['layer']} | {r['kv_head']} | {r['answer_mass']:.3f} | "
                     f"{r['question_mass']:.3f} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    results = ResultsFile(args.out)
    results.write({"command": command, "args": vars(args), "summary": summaries, "heads": heads}, "\n".join(lines))
    print(results.markdown_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
