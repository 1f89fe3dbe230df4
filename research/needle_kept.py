"""`python -m research.needle_kept`: which of a needle's tokens the SERVED engine keeps, head by head.

The engine as served (bf16, the API server's 2048-token prefill chunk, the default compaction settings; the prompt
is prefilled whole, so the question is among the reference queries), in process: every prompt is answered once per
METHOD:RATIO, and the compact segment each compaction wrote is read back from the worker's state. For the needle's
tokens (its name, `is:`, each token of the value, the token after) the table gives the share of the model's
(layer, KV head) pairs whose segment kept that token. A value whose first token is kept while its later tokens are
not comes back truncated ("8631" for 8636118): the reference queries (the question) look at where the fact is
named and at its first token, only the answer's own queries read the rest, one token after the other.
"""

from __future__ import annotations

import argparse
import sys
import time

from vllm_compact.benchmarks.results import ResultsFile, command_line
from vllm_compact.benchmarks.specs import SpecError, parse_spec

NAME_TOKENS = 6  # tokens of the needle shown before its value: the end of the name and "is:"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m research.needle_kept", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=2000, help="prompt tokens")
    p.add_argument("--depths", type=int, default=20, help="prompts (needle depths evenly spread over [0, 1])")
    p.add_argument("--configs", nargs="+", default=["snapkv:1.1", "snapkv:3", "am-highest-attention:3",
                                                     "am-highest-attention:10"], help="METHOD:RATIO")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the API server's prefill chunk")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--out", default="research/results/needle_kept.json")
    return p


def kept_share(kept: list[list[list[int]]], positions: list[int]) -> list[float]:
    """Share of the (layer, head) pairs whose kept positions (kept[layer][head]) hold each of `positions`."""
    heads = [set(head) for layer in kept for head in layer]
    return [sum(p in head for head in heads) / len(heads) for p in positions]


def value_positions(tokenizer, prompt: str, needle) -> tuple[int, int]:
    """(first, end) positions of the tokens that spell the needle's value in the prompt (by character offsets, so
    a value the tokenizer merges with its neighbours is still found)."""
    start = prompt.index(needle.needle) + needle.needle.rindex(needle.answer)
    stop = start + len(needle.answer)
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    tokens = [i for i, (a, b) in enumerate(offsets) if a < stop and b > start]
    return tokens[0], tokens[-1] + 1


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        configs = [(spec.method, spec.ratio) for spec in map(parse_spec, args.configs)]
    except SpecError as e:
        print(f"research.needle_kept: bad --configs entry: {e}", file=sys.stderr)
        return 2
    command = command_line("python", "-m", "research.needle_kept", *argv)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_compact.core.state import worker_state
    from vllm_compact.data.needle import make_needle_prompt, needle_depths
    from vllm_compact.integration.offline import make_engine, run_requests, sampling_params
    from vllm_compact.server.serve import resolve_model

    model = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(model)
    needles = [make_needle_prompt(tokenizer, args.context, depth, "number", seed=i)
               for i, depth in enumerate(needle_depths(args.depths))]
    floor = min(ratio for _, ratio in configs)
    # Every prompt compacts (roomy pool), and in the step that plans it, before the request can finish.
    llm = make_engine(model, {"ratio": floor, "pool_watermark": 1.0, "layers_per_step": 0}, dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
                      enforce_eager=True)
    segments: dict[str, object] = {}  # the engine's request id -> its latest compact segment

    def record() -> None:
        segments.update({r: rec.segment for r, rec in worker_state().requests.items() if rec.segment is not None})

    rows, prompts = [], []
    started = time.perf_counter()
    for method, ratio in tqdm(configs, desc="configurations", file=sys.stderr):
        items, params = [], []
        for i, needle in enumerate(needles):
            ids = tokenizer.encode(needle.prompt, add_special_tokens=False)
            items.append({"id": f"{method}:{ratio:g}:{i:04d}|", "prompt_token_ids": ids})
            params.append(sampling_params(max_tokens=args.max_tokens, temperature=0, extra_args={
                "kv_compaction_method": method, "kv_compaction_ratio": ratio}))
        t0 = time.perf_counter()
        outputs, _ = run_requests(llm, items, params, on_step=record)
        seconds = time.perf_counter() - t0
        block = worker_state().layer_caches[0].shape[2]  # tokens per KV page
        hits, first_kept, rest_kept = 0, [], []
        for item, needle in zip(items, needles):
            text = outputs[item["id"]].outputs[0].text
            hit = needle.is_answered_by(text)
            hits += hit
            first, end = value_positions(tokenizer, needle.prompt, needle)
            shown = list(range(first - NAME_TOKENS, end + 1))
            segment = next((s for rid, s in segments.items() if rid.startswith(item["id"])), None)
            kept = segment.kept_positions() if segment is not None else None
            share = kept_share(kept, shown) if kept is not None else None
            span = None if segment is None else [segment.start_block * block, segment.end_block * block]
            if span is not None and span[0] <= first and end <= span[1]:
                first_kept.append(share[NAME_TOKENS])
                rest = share[NAME_TOKENS + 1 : NAME_TOKENS + end - first]
                rest_kept.append(sum(rest) / len(rest) if rest else share[NAME_TOKENS])
            prompts.append({"method": method, "ratio": ratio, "depth": needle.depth, "answer": needle.answer,
                            "completion": text, "hit": hit,
                            "positions": shown, "span": span,
                            "tokens": [tokenizer.decode([item["prompt_token_ids"][p]]) for p in shown],
                            "kept_share": share})
        rows.append({"method": method, "ratio": ratio, "hits": hits, "total": len(needles),
                     "value_first_token_kept": sum(first_kept) / max(1, len(first_kept)),
                     "value_other_tokens_kept": sum(rest_kept) / max(1, len(rest_kept)),
                     "needles_in_span": len(first_kept), "seconds": seconds})
    meta = {"model": args.model, "dtype": args.dtype, "context_tokens": args.context,
            "max_num_batched_tokens": args.max_num_batched_tokens, "command": command,
            "minutes": (time.perf_counter() - started) / 60}
    results = ResultsFile(args.out)
    results.write({**meta, "rows": rows, "prompts": prompts}, render(meta, rows, prompts))
    print(results.markdown_path.read_text())
    return 0


def render(meta: dict, rows: list[dict], prompts: list[dict]) -> str:
    lines = [f"# Which needle tokens the served engine keeps ({meta['model']}, {meta['dtype']}, "
             f"{meta['context_tokens']}-token prompts, prefill chunk {meta['max_num_batched_tokens']})", "",
             f"`{meta['command']}` ({meta['minutes']:.1f} min). Kept: share of (layer, KV head) pairs whose compact "
             "segment holds the token, mean over the needles inside the compacted span.", "",
             "| method | ratio | hits | value's first token kept | value's other tokens kept |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['ratio']:g} | {r['hits']}/{r['total']} | {r['value_first_token_kept']:.2f} | "
              f"{r['value_other_tokens_kept']:.2f} |" for r in rows]
    lines += ["", "Missed needles, token by token (share of heads keeping each token):", ""]
    for p in prompts:
        if not p["hit"] and p["kept_share"] is not None:
            pairs = " ".join(f"`{t}` {s:.2f}" for t, s in zip(p["tokens"], p["kept_share"]))
            lines.append(f"- {p['method']} {p['ratio']:g}x, depth {p['depth']:.2f}, {p['answer']} -> "
                         f"{p['completion'].strip()[:24]!r}: {pairs}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
