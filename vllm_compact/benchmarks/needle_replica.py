"""`vllm-compact bench needle-replica`: does the ANSWER survive one engine compaction, lever by lever (offline).

An offline replica of the engine's compaction of a needle prompt with the question at the end: transformers
captures post-RoPE keys/values and the queries of the prompt's last `--recent` tokens (the engine's reservoir, the
question among them); the span between the protected head block and the recent window is compacted in one batched
call; greedy decoding continues over [head ; compact entries with beta ; recent window] with the plain-torch
reference forward at the original positions. A configuration is `METHOD:RATIO[:OPTION=VALUE...][:protect]`:
options are the method's dataclass fields (`refit_values=0`, `follow_tokens=16`, `weight_bounds=1` for beta = 0,
`ridge_grid=` for none), except `queries=SOURCES`, the reference queries (`after`, the engine's reservoir, by
default; `after+context` adds the span's own queries, strided: queries spread over the whole prompt); `protect`
forces the needle sentence's keys into every head (an oracle: is keeping the fact enough?).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-compact bench needle-replica", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="needle depths (those inside the compacted span)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one prompt per seed and depth")
    p.add_argument("--configs", nargs="+", required=True, help="METHOD:RATIO[:OPTION=VALUE...][:protect]")
    p.add_argument("--protected", type=int, default=128, help="leading tokens never compacted (one vLLM CPU block)")
    p.add_argument("--recent", type=int, default=256, help="recent window (its queries are the reservoir)")
    p.add_argument("--answer-tokens", type=int, default=10)
    p.add_argument("--out", default="bench/results/needle_replica.json")
    return p


def _option(key: str, raw: str):
    if key == "ridge_grid":
        return tuple(float(x) for x in raw.split("/") if x)
    if key == "weight_bounds":
        low, _, high = raw.partition("/")
        return (float(low), float(high or low))
    if key in ("refit_values", "shrink_to_original"):
        return raw.lower() in ("1", "true")
    return int(raw) if raw.lstrip("-").isdigit() else float(raw)


def parse_config(config: str) -> tuple[str, float, dict, bool, str]:
    method, ratio, *rest = config.split(":")
    pairs = [p.partition("=") for p in rest if p and p != "protect"]
    options = {k: _option(k, v) for k, _, v in pairs if k != "queries"}
    queries = next((v for k, _, v in pairs if k == "queries"), "after")
    if any(source not in ("after", "context", "repeat") for source in queries.split("+")):
        raise ValueError(f"queries must be after, context or repeat joined by +, not {queries!r}")
    return method, float(ratio), options, "protect" in rest, queries


def _needle_positions(tokenizer, ids: list[int], needle) -> list[int]:
    """The needle sentence's token positions in the prompt (through its value and the two tokens after)."""
    from vllm_compact.benchmarks.needle_diagnosis import _find

    value = tokenizer.encode(needle.answer, add_special_tokens=False)
    end = _find(ids, value) + len(value)
    sentence = len(tokenizer.encode(needle.needle, add_special_tokens=False))
    return list(range(end - sentence - 1, end + 2))


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for config in args.configs:
        try:
            parse_config(config)
        except ValueError as e:
            print(f"vllm-compact bench needle-replica: bad --configs entry {config!r}: {e}", file=sys.stderr)
            return 2
    import torch
    from tqdm import tqdm

    from vllm_compact.benchmarks.capture import load_model
    from vllm_compact.benchmarks.needle_sources import _Replica
    from vllm_compact.benchmarks.reference_llama import ReferenceLlama
    from vllm_compact.data.needle import make_needle_prompt
    from vllm_compact.server.serve import resolve_model

    model, tokenizer = load_model(Path(resolve_model(args.model)))
    reference = ReferenceLlama(model)
    settings = argparse.Namespace(recent=args.recent, protected=args.protected, max_queries=4096,
                                  answer_tokens=args.answer_tokens)
    configs = ["none", *args.configs]
    counts = {c: [0, 0] for c in configs}
    answers = []
    started = time.perf_counter()
    prompts = [(seed, depth) for seed in args.seeds for depth in args.depths]
    for seed, depth in tqdm(prompts, desc="needle prompts", file=sys.stderr):
        needle = make_needle_prompt(tokenizer, args.context, depth, "number", seed=seed)
        ids = tokenizer.encode(needle.prompt, add_special_tokens=False)
        # The last prompt token is decoded over the cache; the recent window before it holds the question.
        replica = _Replica(model, reference, tokenizer, ids, 1, settings)
        positions = _needle_positions(tokenizer, ids, needle)
        for config in configs:
            with torch.no_grad():
                if config == "none":
                    cache = replica.full
                else:
                    method, ratio, options, protect, queries = parse_config(config)
                    cache = replica.compacted_cache(method, ratio, queries, options, positions if protect else None)
                text = replica.answer(cache)
            hit = needle.is_answered_by(text)
            counts[config][0] += hit
            counts[config][1] += 1
            answers.append({"config": config, "seed": seed, "depth": needle.depth, "answer": needle.answer,
                            "completion": text, "hit": hit})
    rows = [{"config": c, "model": args.model, "context_tokens": args.context, "question": "end", "hits": h,
             "total": n} for c, (h, n) in counts.items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "answers": answers}, indent=1))
    lines = ["# Does the answer survive one compaction? (offline replica, question at the end)", "",
             f"Command: `vllm-compact bench needle-replica --context {args.context} --depths "
             f"{' '.join(f'{d:g}' for d in args.depths)} --seeds {' '.join(map(str, args.seeds))} --configs "
             f"{' '.join(args.configs)}`; model {args.model}, protected {args.protected}, recent window "
             f"{args.recent}; {(time.perf_counter() - started) / 60:.1f} min.", "",
             "| configuration | hits |", "|---|---|"]
    lines += [f"| {r['config']} | {r['hits']}/{r['total']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
