"""`vllm-compact bench needle`: needle-in-a-haystack accuracy and held-out log-perplexity through the engine.

Query-agnostic compaction: the question comes at the end of the prompt, and pages are compacted during chunked
prefill, before the question is seen. Every method runs through the same engine path; `none` is full context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

METHODS = ("none", "recent", "snapkv", "am-highest-attention", "am-omp")
MODULE = "vllm_compact.benchmarks.needle"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-compact bench needle", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or path")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 7680], help="prompt lengths in tokens")
    p.add_argument("--depths", type=int, default=5, help="needle depths per context, evenly spaced in [0, 1]")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ratios", type=float, nargs="+", default=[5, 10, 20])
    p.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens (chunked prefill size)")
    p.add_argument("--trigger", type=int, default=512, help="compaction trigger_tokens")
    p.add_argument("--recent", type=int, default=256, help="protected recent window (reference queries)")
    p.add_argument("--protected", type=int, default=4, help="protected initial tokens")
    p.add_argument("--continuation-tokens", type=int, default=256, help="held-out essay tokens scored for log-ppl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/needle.json")
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p


def _run_job(job: dict) -> dict:
    """One engine configuration in this process: all needle prompts and continuations."""
    from transformers import AutoTokenizer
    from vllm_compact.integration.offline import make_engine, run_requests, sampling_params, stats_dict
    from vllm_compact.data.needle import continuation_split, make_needle_prompt, needle_depths

    tok = AutoTokenizer.from_pretrained(job["model"])
    compaction = None
    if job["method"] != "none":
        compaction = {"method": job["method"], "ratio": job["ratio"], "trigger_tokens": job["trigger"],
                      "recent_window_tokens": job["recent"], "protected_initial_tokens": job["protected"],
                      # every prompt compacts (roomy pool), and answers are judged on the compacted context
                      "pool_watermark": 1.0, "layers_per_step": 0}
    llm = make_engine(job["model"], compaction, enforce_eager=True, max_model_len=8192, seed=0,
                      max_num_batched_tokens=job["chunk"], enable_chunked_prefill=True)
    prompts, params, meta = [], [], []
    depths = needle_depths(job["depths"])
    for ctx in job["contexts"]:
        for i, depth in enumerate(depths):
            needle = make_needle_prompt(tok, ctx, depth, "number", seed=job["seed"] + i)
            ids = tok.encode(needle.prompt, add_special_tokens=False)
            prompts.append({"id": f"needle-{ctx}-{i}", "prompt_token_ids": ids})
            params.append(sampling_params(temperature=0.0, max_tokens=12))
            meta.append(("needle", ctx, needle.answer))
        split = continuation_split(tok, ctx - job["continuation_tokens"], job["continuation_tokens"], seed=job["seed"])
        prompts.append({"id": f"ppl-{ctx}", "prompt_token_ids": split.context_ids + split.continuation_ids})
        params.append(sampling_params(temperature=0.0, max_tokens=1, prompt_logprobs=0))
        meta.append(("ppl", ctx, len(split.continuation_ids)))
    outputs, stats = run_requests(llm, prompts, params)
    rows = {}
    for prompt, (kind, ctx, info) in zip(prompts, meta):
        out = outputs[prompt["id"]]
        row = rows.setdefault(ctx, {"hits": 0, "total": 0, "logppl": None})
        if kind == "needle":
            row["total"] += 1
            row["hits"] += int(info in out.outputs[0].text)
        else:
            scored = out.prompt_logprobs[-info:]
            ids = prompt["prompt_token_ids"][-info:]
            row["logppl"] = -sum(d[t].logprob for d, t in zip(scored, ids)) / info
    return {"rows": {str(k): v for k, v in rows.items()}, "stats": stats_dict(stats)}


def _markdown(rows: list[dict], args, elapsed: float) -> str:
    lines = [
        "# Needle in a haystack through the engine",
        "",
        f"Command: `vllm-compact bench needle --contexts {' '.join(map(str, args.contexts))} --ratios "
        f"{' '.join(str(r) for r in args.ratios)}` (chunk {args.chunk}, trigger {args.trigger}, recent window "
        f"{args.recent}); model {args.model}; {platform.machine()} CPU x{os.cpu_count()}; {elapsed / 60:.1f} min.",
        "",
        "Needle accuracy (hits / prompts) and log-perplexity of a held-out essay continuation "
        f"({args.continuation_tokens} tokens after the context), per context length.",
        "",
        "| method | ratio | " + " | ".join(f"{c} acc | {c} logppl" for c in args.contexts) + " | all acc |",
        "|---|---|" + "---|---|" * len(args.contexts) + "---|",
    ]
    by_config: dict[tuple, dict] = {}
    for r in rows:
        by_config.setdefault((r["method"], r["ratio"]), {})[r["context_tokens"]] = r
    for (method, ratio), per_ctx in by_config.items():
        cells, hits, total = [], 0, 0
        for c in args.contexts:
            r = per_ctx.get(c)
            if r is None:
                cells += ["-", "-"]
                continue
            cells += [f"{r['hits']}/{r['prompts']}", f"{r['logppl']:.3f}"]
            hits, total = hits + r["hits"], total + r["prompts"]
        lines.append(f"| {method} | {ratio:g} | " + " | ".join(cells) + f" | {hits}/{total} |")
    lines += ["", *_targets(rows)]
    return "\n".join(lines) + "\n"


def _accuracy(rows: list[dict], method: str, ratio: float) -> tuple[int, int] | None:
    sel = [r for r in rows if r["method"] == method and r["ratio"] == ratio]
    return (sum(r["hits"] for r in sel), sum(r["prompts"] for r in sel)) if sel else None


def _targets(rows: list[dict]) -> list[str]:
    out = ["Targets:"]
    full = _accuracy(rows, "none", 1.0)
    am10 = _accuracy(rows, "am-highest-attention", 10.0)
    am20 = _accuracy(rows, "am-highest-attention", 20.0)
    snap20 = _accuracy(rows, "snapkv", 20.0)
    checks = [
        ("full context all correct (15/15 on the full grid)", full, lambda: full[0] == full[1]),
        ("AM at 10x >= 14/15", am10, lambda: am10[0] >= math.ceil(am10[1] * 14 / 15)),
        ("AM at 20x >= 12/15", am20, lambda: am20[0] >= math.ceil(am20[1] * 12 / 15)),
        ("AM strictly above snapkv at 20x", am20 and snap20, lambda: am20[0] > snap20[0]),
    ]
    for name, present, ok in checks:
        out.append(f"- {name}: {'not run' if not present else ('PASS' if ok() else 'FAIL')}")
    return out


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.job:
        result = _run_job(json.loads(args.job))
        Path(args.out).write_text(json.dumps(result))
        return 0
    from tqdm import tqdm

    from vllm_compact.benchmarks.engine_loop import run_isolated
    from vllm_compact.server.serve import resolve_model

    model = resolve_model(args.model)
    configs = [("none", 1.0)] if "none" in args.methods else []
    configs += [(m, r) for m in args.methods if m != "none" for r in args.ratios]
    rows = _previous_rows(Path(args.out), configs, args)
    started = time.perf_counter()
    for method, ratio in tqdm(configs, desc="needle configs", file=sys.stderr):
        job = {"model": model, "method": method, "ratio": ratio, "contexts": args.contexts, "depths": args.depths,
               "chunk": args.chunk, "trigger": args.trigger, "recent": args.recent, "protected": args.protected,
               "continuation_tokens": args.continuation_tokens, "seed": args.seed}
        result = run_isolated(MODULE, job)
        for ctx, r in result["rows"].items():
            rows.append({"method": method, "ratio": ratio, "context_tokens": int(ctx),
                         "needle_accuracy": r["hits"] / r["total"], "logppl": r["logppl"], "hits": r["hits"],
                         "prompts": r["total"], "wall_seconds": result["stats"]["wall_seconds"],
                         "settings": _settings(args)})
        _write(rows, args, time.perf_counter() - started)  # partial results survive an interruption
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


def _previous_rows(out: Path, configs: list[tuple[str, float]], args) -> list[dict]:
    """Rows of earlier runs with the same contexts and settings, except the configurations run again now."""
    if not out.is_file():
        return []
    rows = json.loads(out.read_text())
    same = [r for r in rows if r.get("settings") == _settings(args)]
    return [r for r in same if (r["method"], r["ratio"]) not in configs]


def _settings(args) -> dict:
    return {"model": args.model, "chunk": args.chunk, "trigger": args.trigger, "recent": args.recent,
            "protected": args.protected, "depths": args.depths, "continuation_tokens": args.continuation_tokens,
            "seed": args.seed}


def _write(rows: list[dict], args, elapsed: float) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(_markdown(rows, args, elapsed))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
