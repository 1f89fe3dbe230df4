"""`vllm-compact bench needle-serving`: needle accuracy through a RUNNING server, as a user's client sees it.

Start the server as a user does (`make serve`: bf16, the API server's chunking, default compaction settings), then
point this at it. Every prompt goes to `/v1/completions`; the method and ratio are asked per request
(`vllm_xargs`), `none` is the same server with compaction turned off for the request. The question sits at the end
of the prompt. With the server's defaults compaction runs once the prompt is prefilled, so its reference queries
include the question (`--question end`). Started with `--kv-compaction-during-prefill --max-num-batched-tokens 512
--kv-compaction-trigger 512`, the server compacts chunk by chunk, before the question is read (`--question after`:
query-agnostic compaction); the flag only labels the rows, the server's settings decide.
Compaction seconds per compacted request come from the server's /v1/compaction/stats (worker seconds_total).
`--kinds` picks the needle wording: number, word, or multi (three confusable number facts, one asked).

`--out` is a merged table: a run's rows replace the rows with the same key (KEY) and keep all others, so runs
against differently started servers add up to one table; each row records the server and bench command lines.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from vllm_compact.benchmarks.results import ResultsFile, command_line

KEY = ("model", "method", "ratio", "dtype", "context_tokens", "question", "head_budgets", "kind")


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
    p.add_argument("--head-budgets", choices=["calibrated", "uniform"], default="calibrated",
                   help="the server's per-head budgets (a label; the server's default is calibrated)")
    p.add_argument("--kinds", nargs="+", choices=["number", "word", "multi"], default=["number"],
                   help="needle wording; multi: three facts with the same noun, one asked")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests in flight at once, as an evaluation client sends them (the server batches them)")
    p.add_argument("--server-command", default="make serve", help="how the server was started (recorded)")
    p.add_argument("--out", default="bench/results/needle_serving.json")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    bench_command = command_line("vllm-compact", "bench", "needle-serving", *argv)
    import requests
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_compact.data.needle import make_multi_needle_prompt, make_needle_prompt, needle_depths
    from vllm_compact.server.serve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    served = requests.get(f"{args.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    configs = [("none", 1.0)] * ("none" in args.methods)
    configs += [(m, r) for m in args.methods if m != "none" for r in args.ratios]
    groups = {(kind, ctx): [make_multi_needle_prompt(tokenizer, ctx, depth, seed=i) if kind == "multi"
                            else make_needle_prompt(tokenizer, ctx, depth, kind, seed=i)
                            for i, depth in enumerate(needle_depths(args.depths))]
              for kind in args.kinds for ctx in args.contexts}
    labels = {"model": args.model, "dtype": args.dtype, "question": args.question, "head_budgets": args.head_budgets}
    rows, answers = [], []
    started = time.perf_counter()
    for method, ratio in tqdm(configs, desc="configurations", file=sys.stderr):
        xargs = ({"kv_compaction_enabled": False} if method == "none"
                 else {"kv_compaction_method": method, "kv_compaction_ratio": ratio})
        for (kind, ctx), group in groups.items():
            before = _worker_stats(args.base_url)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                replies = list(pool.map(
                    lambda needle: _complete(args.base_url, served, needle.prompt, args.max_tokens, xargs), group))
            seconds = time.perf_counter() - t0
            after = _worker_stats(args.base_url)
            hits = 0
            for needle, (text, usage) in zip(group, replies):
                hit = needle.is_answered_by(text)
                hits += hit
                answers.append({**labels, "method": method, "ratio": ratio, "context_tokens": ctx, "kind": kind,
                                "depth": needle.depth, "seed": needle.seed, "answer": needle.answer,
                                "completion": text, "hit": hit, "usage": usage})
            # With several requests in flight the wall time is a throughput figure: seconds / request of the group.
            rows.append({**labels, "method": method, "ratio": ratio, "context_tokens": ctx, "kind": kind,
                         "hits": hits, "total": len(group), "seconds_per_request": seconds / len(group),
                         "compactions": after["compactions"] - before["compactions"],
                         "compaction_seconds_per_request": (after["seconds_total"] - before["seconds_total"])
                         / len(group),
                         "concurrency": args.concurrency,
                         "server_command": args.server_command, "bench_command": bench_command})
    print(f"{(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)
    results = ResultsFile(args.out)
    old = results.read() or {"rows": [], "answers": []}
    rows = _merge(old["rows"], rows, KEY)
    answers = _merge(old["answers"], answers, KEY + ("depth", "seed"))
    # the rows of earlier runs keep their own commands; `command` is the latest run's
    results.write({"command": bench_command, "rows": rows, "answers": answers}, render(rows))
    print(results.markdown_path.read_text())
    return 0


def _key(record: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(record.get(f, "number" if f == "kind" else None) for f in fields)  # rows older than kinds: number


def _merge(old: list[dict], new: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """`old` without the records that `new` replaces (same key), then `new`."""
    replaced = {_key(r, fields) for r in new}
    return [{"kind": "number", **r} for r in old if _key(r, fields) not in replaced] + new


def render(rows: list[dict]) -> str:
    """One table of all rows, sorted; the command lines are listed once and numbered."""
    rows = sorted(rows, key=lambda r: (r["model"], r["question"], r["head_budgets"], r["kind"],
                                       r["method"] != "none", r["method"], r["ratio"], r["context_tokens"]))
    commands: dict[tuple[str, str], int] = {}
    for r in rows:
        commands.setdefault((r.get("server_command", "?"), r.get("bench_command", "?")), len(commands) + 1)
    lines = ["# Needle accuracy through a running server", "",
             "`question end`: compaction once the prompt (question included) is prefilled; `after`: compaction chunk "
             "by chunk during prefill, before the question is read. `hits`: completions containing the asked value "
             "(one prompt per depth). Compaction seconds come from the server's /v1/compaction/stats.", "",
             "| model | question | head budgets | kind | method | ratio | context | dtype | hits | s / request | "
             "compactions | compaction s / request | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['question']} | {r['head_budgets']} | {r['kind']} | {r['method']} | "
                     f"{r['ratio']:g} | {r['context_tokens']} | {r['dtype']} | {r['hits']}/{r['total']} | "
                     f"{r['seconds_per_request']:.1f} | {r['compactions']} | "
                     f"{r['compaction_seconds_per_request']:.2f} | "
                     f"{commands[(r.get('server_command', '?'), r.get('bench_command', '?'))]} |")
    lines += ["", "Commands (server started from the repository root, then the bench against it):", ""]
    lines += [f"{n}. server `{server}`; bench `{bench}`" for (server, bench), n in commands.items()]
    return "\n".join(lines) + "\n"


def _complete(base_url: str, served: str, prompt: str, max_tokens: int, xargs: dict) -> tuple[str, dict]:
    """Greedy completion text and its `usage.kv_compaction`."""
    import requests

    reply = requests.post(f"{base_url}/v1/completions", timeout=1800, json={
        "model": served, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "vllm_xargs": xargs})
    reply.raise_for_status()
    body = reply.json()
    return body["choices"][0]["text"], body.get("usage", {}).get("kv_compaction", {})


def _worker_stats(base_url: str) -> dict:
    import requests

    reply = requests.get(f"{base_url}/v1/compaction/stats", timeout=30)
    worker = reply.json().get("worker", {}) if reply.status_code == 200 else {}
    return {"compactions": worker.get("compactions", 0), "seconds_total": worker.get("seconds_total", 0.0)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
