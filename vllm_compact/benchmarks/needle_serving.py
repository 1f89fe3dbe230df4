"""`vllm-compact bench needle-serving`: needle accuracy through a RUNNING server, as a user's client sees it.

Start the server as a user does (`make serve`: bf16, the API server's chunking, default compaction settings), then
point this at it. Every prompt goes to `/v1/completions`; the method and ratio are asked per request
(`vllm_xargs`), `none` is the same server with compaction turned off for the request. The question sits at the end
of the prompt. With the server's defaults compaction runs once the prompt is prefilled, so its reference queries
include the question (`--question end`). Started with `--kv-compaction-during-prefill --max-num-batched-tokens 256
--kv-compaction-trigger 256`, the server compacts chunk by chunk, before the question is read (`--question after`:
query-agnostic compaction); the flag only labels the rows, the server's settings decide.
Compaction seconds per compacted request come from the server's /v1/compaction/stats (worker seconds_total).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-compact bench needle-serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the running server")
    p.add_argument("--model", default="smollm2-135m", help="our model name (for its tokenizer) or a path")
    p.add_argument("--dtype", default="bfloat16", help="the server's dtype, recorded in each row")
    p.add_argument("--contexts", type=int, nargs="+", default=[2000])
    p.add_argument("--depths", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=["none", "snapkv", "am-highest-attention"])
    p.add_argument("--ratios", type=float, nargs="+", default=[10.0])
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--question", choices=["end", "after"], default="end",
                   help="where the server's settings put compaction relative to the question (a label, see above)")
    p.add_argument("--head-budgets", default="uniform", help="the server's per-head budgets (a label)")
    p.add_argument("--server-command", default="make serve", help="how the server was started (recorded)")
    p.add_argument("--out", default="bench/results/needle_serving.json")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import requests
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_compact.data.needle import make_needle_prompt, needle_depths
    from vllm_compact.server.serve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    served = requests.get(f"{args.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    configs = [("none", 1.0)] * ("none" in args.methods)
    configs += [(m, r) for m in args.methods if m != "none" for r in args.ratios]
    prompts = [(ctx, i, make_needle_prompt(tokenizer, ctx, depth, "number", seed=i))
               for ctx in args.contexts for i, depth in enumerate(needle_depths(args.depths))]
    rows, answers = [], []
    started = time.perf_counter()
    for method, ratio in tqdm(configs, desc="configurations", file=sys.stderr):
        xargs = ({"kv_compaction_enabled": False} if method == "none"
                 else {"kv_compaction_method": method, "kv_compaction_ratio": ratio})
        tally: dict[int, list] = {}
        for ctx, i, needle in prompts:
            before = _worker_stats(args.base_url)
            t0 = time.perf_counter()
            reply = requests.post(f"{args.base_url}/v1/completions", timeout=900, json={
                "model": served, "prompt": needle.prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "vllm_xargs": xargs})
            reply.raise_for_status()
            body = reply.json()
            text = body["choices"][0]["text"]
            usage = body.get("usage", {}).get("kv_compaction", {})
            hit = needle.is_answered_by(text)
            after = _worker_stats(args.base_url)
            t = tally.setdefault(ctx, [0, 0, 0.0, 0, 0.0])
            t[0], t[1], t[2] = t[0] + hit, t[1] + 1, t[2] + time.perf_counter() - t0
            t[3] += after["compactions"] - before["compactions"]
            t[4] += after["seconds_total"] - before["seconds_total"]
            answers.append({"method": method, "ratio": ratio, "context_tokens": ctx, "depth": needle.depth,
                            "answer": needle.answer, "completion": text, "hit": hit, "usage": usage})
        for ctx, (hits, total, seconds, compactions, compaction_seconds) in tally.items():
            rows.append({"model": args.model, "method": method, "ratio": ratio, "dtype": args.dtype,
                         "context_tokens": ctx, "question": args.question, "head_budgets": args.head_budgets,
                         "hits": hits, "total": total, "seconds_per_request": seconds / total,
                         "compactions": compactions,
                         "compaction_seconds_per_request": compaction_seconds / total})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "answers": answers}, indent=1))
    lines = [f"# Needle accuracy through a running server (question {args.question})", "",
             f"Command: `vllm-compact bench needle-serving --base-url URL --contexts "
             f"{' '.join(map(str, args.contexts))} --depths {args.depths} --methods {' '.join(args.methods)} "
             f"--ratios {' '.join(f'{r:g}' for r in args.ratios)} --question {args.question}` against a server started "
             f"as `{args.server_command}` (model {args.model}, {args.dtype}); "
             f"{(time.perf_counter() - started) / 60:.1f} min.", "",
             "| model | method | ratio | dtype | context | question | head budgets | hits | s / request | "
             "compactions | compaction s / request |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['ratio']:g} | {r['dtype']} | {r['context_tokens']} | "
                     f"{r['question']} | {r['head_budgets']} | {r['hits']}/{r['total']} | "
                     f"{r['seconds_per_request']:.1f} | {r['compactions']} | "
                     f"{r['compaction_seconds_per_request']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


def _worker_stats(base_url: str) -> dict:
    import requests

    reply = requests.get(f"{base_url}/v1/compaction/stats", timeout=30)
    worker = reply.json().get("worker", {}) if reply.status_code == 200 else {}
    return {"compactions": worker.get("compactions", 0), "seconds_total": worker.get("seconds_total", 0.0)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
