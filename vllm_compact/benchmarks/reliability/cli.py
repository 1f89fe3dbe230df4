"""The `vllm-compact bench reliability` command: arguments, the run from start to stop, the JSON and markdown."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from vllm_compact.benchmarks import reliability
from vllm_compact.benchmarks.reliability.client import run_load
from vllm_compact.benchmarks.reliability.outcomes import breakdown, is_lost, summarise
from vllm_compact.benchmarks.reliability.report import markdown
from vllm_compact.benchmarks.results import ResultsFile, command_line
from vllm_compact.benchmarks.reliability.request_specs import make_specs, parse_rules, token_source
from vllm_compact.benchmarks.reliability.server import (
    fault_switch,
    get_json,
    idle_stats,
    log_counts,
    read_preemptions,
    start_server,
    stop_server,
    tiny_completion,
)


def _parser() -> argparse.ArgumentParser:
    # the package docstring is the command's description
    p = argparse.ArgumentParser(prog="vllm-compact bench reliability", description=reliability.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running compacting server, e.g. http://127.0.0.1:8000 (started with "
                       "VLLM_COMPACT_FAULTS=rate=R,seed=S in its environment to inject faults)")
    where.add_argument("--start-server", action="store_true",
                       help="start `vllm-compact serve MODEL --kv-compaction ...` here, with the fault switch set, "
                            "and stop it at the end")
    p.add_argument("--model", default="smollm2-135m",
                   help="our model name or a path: the tokenizer for the prompts, and the model --start-server serves "
                        "(default: %(default)s)")
    p.add_argument("--requests", type=int, default=1000, help="requests to send (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    p.add_argument("--min-prompt", type=int, default=200, help="shortest prompt, tokens (default: %(default)s)")
    p.add_argument("--max-prompt", type=int, default=900, help="longest prompt, tokens (default: %(default)s)")
    p.add_argument("--min-tokens", type=int, default=8, help="smallest max_tokens (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=24, help="largest max_tokens (default: %(default)s)")
    p.add_argument("--chat-share", type=float, default=0.5, help="share of chat completions (default: %(default)s)")
    p.add_argument("--stream-share", type=float, default=0.5, help="share of streaming requests (default: %(default)s)")
    p.add_argument("--valid-override-share", type=float, default=0.35,
                   help="share of requests with valid kv_compaction_* keys (default: %(default)s)")
    p.add_argument("--invalid-override-share", type=float, default=0.2,
                   help="share of requests with invalid ones, which must be rejected (default: %(default)s)")
    p.add_argument("--disconnect-share", type=float, default=0.1,
                   help="share of requests the client drops before the answer is complete (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=900.0,
                   help="seconds a client waits for one answer before counting it lost (default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=180.0,
                   help="seconds to wait for the server to go idle before reading its free pages "
                        "(default: %(default)s)")
    server = p.add_argument_group("--start-server")
    server.add_argument("--fault-rate", type=float, default=0.25,
                        help="VLLM_COMPACT_FAULTS rate: share of compaction solves that raise or return NaN, and "
                             "of page reads and writes that raise (default: %(default)s)")
    server.add_argument("--fault-seed", type=int, default=0, help="VLLM_COMPACT_FAULTS seed (default: %(default)s)")
    server.add_argument("--fault-sites", default="solve+gather+write",
                        help="VLLM_COMPACT_FAULTS sites, '+'-separated among solve, gather (reading the source "
                             "pages), write (writing the compact pages) (default: %(default)s)")
    server.add_argument("--trigger", type=int, default=256, help="--kv-compaction-trigger (default: %(default)s)")
    server.add_argument("--recent-window", type=int, default=64,
                        help="--kv-compaction-recent-window (default: %(default)s)")
    server.add_argument("--server-args", default="--block-size 32 --max-model-len 2048 --enforce-eager",
                        help="more `vllm-compact serve` flags, one string: --server-args=\"--block-size 32 ...\" (default: %(default)r)")
    server.add_argument("--server-log", default=None,
                        help="where the server's output goes (default: beside --out, <out>_server.log; not "
                             "meant to be committed)")
    server.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for /health (default: %(default)s)")
    p.add_argument("--out", default="bench/results/reliability.json", help="JSON result; markdown beside it")
    return p


def code_version() -> dict:
    """The commit this ran from, and the tracked files that differed from it (a shared working tree)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=30,
                                  cwd=Path(__file__).resolve().parent).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]}


def _trim(stats: dict | None) -> dict | None:
    return None if stats is None else {k: v for k, v in stats.items() if k != "requests"}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_compact.server.serve import resolve_model

    command = command_line("vllm-compact", "bench", "reliability", *argv)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    code = code_version()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    source = token_source(tokenizer, args.max_prompt)
    process, server_info = None, None
    started = time.perf_counter()
    if args.start_server:
        log_path = Path(args.server_log or out_path.with_name(out_path.stem + "_server.log"))
        process, base_url, cmd = start_server(args, log_path)
        server_info = {"command": command_line("vllm-compact", *cmd[1:]),
                       "env": f"VLLM_COMPACT_FAULTS={fault_switch(args)}",
                       "log": str(log_path)}
    else:
        base_url = args.base_url.rstrip("/")
    try:
        _, models = get_json(base_url, "/v1/models")
        served = models["data"][0]["id"]
        status, config_body = get_json(base_url, "/v1/compaction/config")
        if status != 200 or not config_body["config"]["enabled"]:
            print("this server does not have compaction on (GET /v1/compaction/config)", file=sys.stderr)
            return 2
        rules = parse_rules(config_body)
        specs = make_specs(args, rules, len(source))
        prompts = {s.index: tokenizer.decode(source[s.prompt_offset:s.prompt_offset + s.prompt_tokens]) for s in specs}
        stats_start = idle_stats(base_url, served, args.idle_timeout)
        preempted_start = read_preemptions(base_url)
        load_started = time.perf_counter()
        outcomes = asyncio.run(run_load(base_url, served, specs, prompts, args.concurrency, args.request_timeout))
        load_s = time.perf_counter() - load_started
        stats_end = idle_stats(base_url, served, args.idle_timeout)
        preempted_end = read_preemptions(base_url)
        try:
            alive = get_json(base_url, "/health")[0] == 200 and tiny_completion(base_url, served)
        except Exception:  # noqa: BLE001 - a dead server is the finding
            alive = False
    finally:
        if process is not None:
            log_size = Path(server_info["log"]).stat().st_size
            stop_server(process)
    if server_info is not None:
        server_info["log_counts"] = log_counts(Path(server_info["log"]), upto=log_size)
        server_info["log_counts_at_stop"] = log_counts(Path(server_info["log"]))
    summary = summarise(specs, outcomes, stats_start, stats_end, alive)
    summary["preemptions"] = (None if preempted_start is None or preempted_end is None
                              else preempted_end - preempted_start)
    by_index = {o.index: o for o in outcomes}
    problems = [{"index": s.index, "endpoint": s.endpoint, "mode": "stream" if s.stream else "json",
                 "overrides": s.overrides, "xargs": s.xargs, **{k: v for k, v in asdict(by_index[s.index]).items()
                                                               if k != "index"}}
                for s in specs if s.index in by_index and is_lost(s, by_index[s.index])]
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    result = {
        "command": command,
        "code": code,
        "summary": summary,
        "settings": settings,
        "server": server_info,
        "base_url": base_url,
        "wall_s": time.perf_counter() - started,
        "load_s": load_s,
        "prompt_tokens": {"min": min(s.prompt_tokens for s in specs), "max": max(s.prompt_tokens for s in specs),
                          "mean": sum(s.prompt_tokens for s in specs) / len(specs)},
        "breakdown": breakdown(specs, outcomes),
        "problems": problems,
        "invalid_accepted": [{"index": s.index, "xargs": s.xargs} for s in specs
                             if not s.expect_valid and by_index[s.index].status == 200],
        "stats_start": _trim(stats_start),
        "stats_end": _trim(stats_end),
    }
    results = ResultsFile(out_path)
    results.write(result, markdown(result))
    print(results.markdown_path.read_text())
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
