"""`vllm-compact bench throughput`: many concurrent long requests in a small KV pool, compaction off vs on.

The pool holds about `--pool-contexts` uncompacted requests; with compaction the same pool runs more of them at
once (capacity) instead of queueing or preempting. On this compute-bound CPU the capacity gain is what carries to
a GPU; requests per minute are reported as measured here.
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

MODULE = "vllm_compact.benchmarks.throughput"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-compact bench throughput", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or path")
    p.add_argument("--requests", type=int, default=16, help="concurrent requests")
    p.add_argument("--prompt-tokens", type=int, default=3072)
    p.add_argument("--max-tokens", type=int, default=256, help="generated tokens per request")
    p.add_argument("--pool-contexts", type=float, default=4.0, help="KV pool size in uncompacted requests")
    p.add_argument("--ratio", type=float, default=10.0)
    p.add_argument("--method", default="am-highest-attention")
    p.add_argument("--trigger", type=int, default=256)
    p.add_argument("--recent", type=int, default=128)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--out", default="bench/results/throughput.json")
    p.add_argument("--modes", nargs="+", choices=["off", "on"], default=["off", "on"],
                   help="which runs to do; rows of the other mode are kept from an earlier run of the same settings")
    p.add_argument("--decode-overhead", action="store_true",
                   help="instead: decode speed of stock vLLM vs compaction enabled but never triggered "
                        "(writes bench/results/decode_overhead.json)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per engine for --decode-overhead")
    p.add_argument("--job", help=argparse.SUPPRESS)
    return p


def _run_job(job: dict) -> dict:
    from transformers import AutoTokenizer
    from vllm_compact.integration.offline import make_engine, run_requests, sampling_params, stats_dict
    from vllm_compact.data.needle import continuation_split

    tok = AutoTokenizer.from_pretrained(job["model"])
    per_request = job["prompt_tokens"] + job["max_tokens"]
    blocks = math.ceil(job["pool_contexts"] * per_request / job["block_size"]) + 1
    compaction = None
    if job["compaction"]:
        compaction = {"method": job["method"], "ratio": job["ratio"], "trigger_tokens": job["trigger"],
                      "recent_window_tokens": job["recent"], "protected_initial_tokens": 4}
    llm = make_engine(job["model"], compaction, enforce_eager=True, max_model_len=8192, seed=0,
                      block_size=job["block_size"], num_gpu_blocks_override=blocks,
                      max_num_batched_tokens=job["chunk"], max_num_seqs=max(16, job["requests"]))
    prompts = []
    for i in range(job["requests"]):
        split = continuation_split(tok, job["prompt_tokens"], 1, seed=i)
        prompts.append({"id": f"r{i}", "prompt_token_ids": split.context_ids})
    params = [sampling_params(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True) for _ in prompts]
    outputs, stats = run_requests(llm, prompts, params)
    done = sum(len(o.outputs[0].token_ids) == job["max_tokens"] for o in outputs.values())
    return {"completed": done, "pool_blocks": blocks, "stats": stats_dict(stats)}


def _run_decode_job(job: dict) -> dict:
    """Decode tokens per second of one engine (stock, or compaction enabled with an unreachable trigger)."""
    from vllm_compact.integration.offline import make_engine, sampling_params

    compaction = {"trigger_tokens": 10**9} if job["compaction"] else None
    # Prefix caching off in both engines (compaction turns it off): with it, the stock engine's timed generate
    # would find the prompts cached by the prefill-only run before it, and its decode figure would exclude prefill.
    llm = make_engine(job["model"], compaction, enforce_eager=True, max_model_len=4096, seed=0,
                      enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": [100 + (7 * i + j) % 1000 for j in range(job["prompt_tokens"])]}
               for i in range(job["requests"])]
    params = sampling_params(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    llm.generate(prompts[:1], sampling_params(max_tokens=4), use_tqdm=False)  # warm-up
    prefill = sampling_params(temperature=0.0, max_tokens=1)
    t0 = time.perf_counter()
    llm.generate(prompts, prefill, use_tqdm=False)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    total_s = time.perf_counter() - t0
    # Decode time = full generation minus the same prefill measured alone.
    return {"decode_tokens_per_s": job["requests"] * (job["max_tokens"] - 1) / max(1e-9, total_s - prefill_s)}


def _decode_overhead(args, model: str) -> int:
    from vllm_compact.benchmarks.engine_loop import run_isolated

    speeds: dict[str, list[float]] = {"stock": [], "enabled, untriggered": []}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        for name, compaction in (("stock", False), ("enabled, untriggered", True)):
            job = {"model": model, "compaction": compaction, "requests": 8, "prompt_tokens": 512, "max_tokens": 128}
            speeds[name].append(run_isolated(MODULE, {"decode": True, **job})["decode_tokens_per_s"])
    best = {k: max(v) for k, v in speeds.items()}
    ratio = best["enabled, untriggered"] / best["stock"]
    rows = [{"engine": k, "decode_tokens_per_s": best[k], "runs": v} for k, v in speeds.items()]
    out = Path(args.out).with_name("decode_overhead.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    md = ["# Decode speed: stock vLLM vs compaction enabled but not triggered", "",
          f"Command: `vllm-compact bench throughput --decode-overhead --repeats {args.repeats}` (8 requests x 512-token "
          f"prompts, 128 generated tokens, best of {args.repeats} alternating runs, prefix caching off in both); "
          f"model {args.model}; "
          f"{platform.machine()} CPU x{os.cpu_count()}.", "",
          "| engine | decode tokens/s (best) | all runs |", "|---|---|---|"]
    md += [f"| {r['engine']} | {r['decode_tokens_per_s']:.1f} | {', '.join(f'{x:.1f}' for x in r['runs'])} |"
           for r in rows]
    md += ["", f"Target: within 3% of stock: {ratio:.3f}x {'PASS' if ratio >= 0.97 else 'FAIL'}"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


def _row(job: dict, result: dict) -> dict:
    s = result["stats"]
    return {
        "compaction": "on" if job["compaction"] else "off",
        "ratio": job["ratio"] if job["compaction"] else 1.0,
        "requests_per_minute": result["completed"] / (s["wall_seconds"] / 60),
        "peak_running": s["peak_running"],
        "preemptions": s["preemptions"],
        "logical_tokens": s["peak_logical_tokens"],
        "physical_tokens": s["physical_at_peak_logical"],
        "completed": result["completed"],
        "wall_seconds": s["wall_seconds"],
        "pool_blocks": result["pool_blocks"],
        "pages_returned": s["free_blocks_final"] == s["free_blocks_initial"],
        "compaction_stats": s["compaction"],
    }


def _markdown(rows: list[dict], args) -> str:
    lines = [
        "# Throughput: concurrent long requests in a small KV pool",
        "",
        f"Command: `vllm-compact bench throughput` ({args.requests} requests x {args.prompt_tokens}-token prompts, "
        f"{args.max_tokens} generated tokens each, pool = {args.pool_contexts:g} uncompacted requests, block size "
        f"{args.block_size}); model {args.model}; compaction {args.method} at {args.ratio:g}x, trigger {args.trigger}, "
        f"recent window {args.recent}; {platform.machine()} CPU x{os.cpu_count()}.",
        "",
        "| compaction | ratio | requests/min | peak running | preemptions | logical tokens | physical tokens | completed | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['compaction']} | {r['ratio']:g} | {r['requests_per_minute']:.2f} | {r['peak_running']} | "
            f"{r['preemptions']} | {r['logical_tokens']} | {r['physical_tokens']} | {r['completed']} | "
            f"{r['wall_seconds']:.0f} |"
        )
    by = {r["compaction"]: r for r in rows}
    if "on" in by and "off" in by:
        on, off = by["on"], by["off"]
        cap = on["peak_running"] / max(1, off["peak_running"])
        rpm = on["requests_per_minute"] / off["requests_per_minute"]
        lines += ["", "Targets:",
                  f"- peak running >= 3.5x: {cap:.2f}x {'PASS' if cap >= 3.5 else 'FAIL'}",
                  f"- requests per minute >= 1.5x: {rpm:.2f}x {'PASS' if rpm >= 1.5 else 'FAIL'}",
                  f"- zero preemptions with compaction on: {'PASS' if on['preemptions'] == 0 else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "requests", "prompt_tokens", "max_tokens", "pool_contexts",
                                          "ratio", "method", "trigger", "recent", "block_size", "chunk")}


def _previous_rows(out: Path, args) -> list[dict]:
    if not out.is_file():
        return []
    rows = json.loads(out.read_text())
    # Rows from before settings were recorded carry none; they were made with the defaults.
    defaults = _settings(_parser().parse_args([]))
    return [r for r in rows if r.get("settings", defaults) == _settings(args)]


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.job:
        job = json.loads(args.job)
        result = _run_decode_job(job) if job.get("decode") else _run_job(job)
        Path(args.out).write_text(json.dumps(result))
        return 0
    from vllm_compact.benchmarks.engine_loop import run_isolated
    from vllm_compact.server.serve import resolve_model

    model = resolve_model(args.model)
    if args.decode_overhead:
        return _decode_overhead(args, model)
    rows = _previous_rows(Path(args.out), args)
    for compaction in (mode == "on" for mode in args.modes):
        job = {"model": model, "compaction": compaction, "requests": args.requests,
               "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
               "pool_contexts": args.pool_contexts, "ratio": args.ratio, "method": args.method,
               "trigger": args.trigger, "recent": args.recent, "block_size": args.block_size, "chunk": args.chunk}
        print(f"throughput: compaction {'on' if compaction else 'off'} ...", file=sys.stderr, flush=True)
        rows = [r for r in rows if r["compaction"] != ("on" if compaction else "off")]
        rows.append({**_row(job, run_isolated(MODULE, job)), "settings": _settings(args)})
        rows.sort(key=lambda r: r["compaction"] == "on")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
        out.with_suffix(".md").write_text(_markdown(rows, args))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
