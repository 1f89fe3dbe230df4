"""`python -m research.needle_replica`: does the ANSWER survive one engine compaction, lever by lever (offline).

An offline replica of the engine's compaction of a needle prompt: transformers captures post-RoPE keys/values and
the queries of the document's last `--recent` tokens (the engine's reservoir); the span between the protected head
block and the recent window is compacted in one batched call; greedy decoding continues over [head ; compact
entries with beta ; recent window] with the plain-torch reference forward at the original positions. With
`--question end` the question is part of the document (among the reservoir's queries: the engine compacting a
fully prefilled prompt); with `--question after` it is fed only after the compaction (query-agnostic, as when the
engine compacts during prefill or the question is a follow-up). A configuration is
`METHOD:RATIO[:OPTION=VALUE...][:protect]` (vllm_compact.benchmarks.specs): options are the method's dataclass
fields (`refit_values=0`, `follow_tokens=16`, `weight_bounds=1` for beta = 0, `ridge_grid=` for none), and `queries=SOURCES`, the
reference queries joined by `+`: `after` (the engine's reservoir, the default), `context` (the span's own queries,
strided: queries spread over the whole prompt), `repeat` (the paper's repeat-prefill: the span's queries when the
model is asked to repeat it), `heldout` (the question's own queries with `--question after`: an oracle); `protect`
forces the needle sentence's keys into every head (an oracle: is keeping the fact enough?).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vllm_compact.benchmarks.results import ResultsFile, command_line
from vllm_compact.benchmarks.specs import MethodSpec, SpecError, parse_spec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m research.needle_replica", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=2048, help="prompt tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="needle depths (those inside the compacted span)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one prompt per seed and depth")
    p.add_argument("--configs", nargs="+", required=True, help="METHOD:RATIO[:OPTION=VALUE...][:protect]")
    p.add_argument("--protected", type=int, default=128, help="leading tokens never compacted (one vLLM CPU block)")
    p.add_argument("--recent", type=int, default=256, help="recent window (its queries are the reservoir)")
    p.add_argument("--question", choices=("end", "after"), default="end",
                   help="the question inside the compacted document's recent window, or fed after the compaction "
                        "(default: %(default)s)")
    p.add_argument("--answer-tokens", type=int, default=10)
    p.add_argument("--out", default="research/results/needle_replica.json")
    return p


QUERY_SOURCES = ("after", "context", "repeat", "heldout")


def parse_config(config: str) -> MethodSpec:
    """A `--configs` entry: METHOD:RATIO, the method's options, `queries=` (default after), `protect`."""
    spec = parse_spec(config, extra_keys=("queries",), flags=("protect",))
    queries = spec.extras.get("queries", "after")
    if any(source not in QUERY_SOURCES for source in queries.split("+")):
        raise SpecError(f"queries must be {', '.join(QUERY_SOURCES)} joined by +, not {queries!r}")
    return spec


def queries_of(spec: MethodSpec) -> str:
    return spec.extras.get("queries", "after")


def _needle_positions(tokenizer, ids: list[int], needle) -> list[int]:
    """The needle sentence's token positions in the prompt (through its value and the two tokens after)."""
    from research.needle_diagnosis import find_subsequence

    value = tokenizer.encode(needle.answer, add_special_tokens=False)
    end = find_subsequence(ids, value) + len(value)
    sentence = len(tokenizer.encode(needle.needle, add_special_tokens=False))
    return list(range(end - sentence - 1, end + 2))


def tokens_after(tokenizer, needle, ids: list[int], question: str) -> int:
    """Prompt tokens fed over the compacted cache. end: the last one (the recent window before it holds the
    question); after: the question and answer prefix (the prompt's last line)."""
    if question == "end":
        return 1
    document = tokenizer.encode(needle.prompt[: needle.prompt.rindex("\n")], add_special_tokens=False)
    if ids[: len(document)] != document:
        raise ValueError("the question does not start on a token boundary")
    return len(ids) - len(document)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for config in args.configs:
        try:
            parse_config(config)
        except SpecError as e:
            print(f"research.needle_replica: bad --configs entry {config!r}: {e}", file=sys.stderr)
            return 2
    import torch
    from tqdm import tqdm

    from vllm_compact.benchmarks.capture import load_model
    from research.replica import Replica
    from tests.reference_llama import ReferenceLlama
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
        replica = Replica(model, reference, tokenizer, ids, tokens_after(tokenizer, needle, ids, args.question),
                           settings)
        positions = _needle_positions(tokenizer, ids, needle)
        for config in configs:
            with torch.no_grad():
                if config == "none":
                    cache = replica.full
                else:
                    spec = parse_config(config)
                    cache = replica.compacted_cache(spec.method, spec.ratio, queries_of(spec), spec.options,
                                                    positions if "protect" in spec.flags else None)
                text = replica.answer(cache)
            hit = needle.is_answered_by(text)
            counts[config][0] += hit
            counts[config][1] += 1
            answers.append({"config": config, "seed": seed, "depth": needle.depth, "answer": needle.answer,
                            "completion": text, "hit": hit})
    rows = [{"config": c, "model": args.model, "context_tokens": args.context, "question": args.question, "hits": h,
             "total": n} for c, (h, n) in counts.items()]
    command = command_line("python", "-m", "research.needle_replica", *argv)
    placement = "at the end" if args.question == "end" else "after the compaction"
    lines = [f"# Does the answer survive one compaction? (offline replica, question {placement})", "",
             f"Command: `{command}`; model {args.model}, protected {args.protected}, recent window {args.recent}; "
             f"{(time.perf_counter() - started) / 60:.1f} min.", "",
             "| configuration | hits |", "|---|---|"]
    lines += [f"| {r['config']} | {r['hits']}/{r['total']} |" for r in rows]
    results = ResultsFile(args.out)
    results.write({"command": command, "args": vars(args), "rows": rows, "answers": answers}, "\n".join(lines))
    print(results.markdown_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
