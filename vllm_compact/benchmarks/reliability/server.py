"""The server under test: start and stop it, read its idle stats and preemptions, count markers in its log."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_compact.benchmarks.reliability.client import json_or_text
from vllm_compact.benchmarks.reliability.request_specs import KEY_ENABLED


def get_json(base_url: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
    import httpx

    reply = httpx.get(base_url + path, timeout=timeout)
    return reply.status_code, json_or_text(reply.content)


def tiny_completion(base_url: str, model: str) -> bool:
    """One short uncompacted completion; True when it is answered in full."""
    import httpx

    try:
        reply = httpx.post(base_url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, "vllm_xargs": {KEY_ENABLED: False}})
        body = reply.json()
        return reply.status_code == 200 and body["usage"]["completion_tokens"] == 2
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def idle_stats(base_url: str, model: str, timeout: float) -> dict | None:
    """The stats file once the engine is idle: nothing running and the free pages steady over 1 s.

    A tiny uncompacted request first makes the scheduler write the file again after everything before it has
    finished (the scheduler writes when a request finishes; an aborted request frees its pages with no step).
    """
    tiny_completion(base_url, model)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, stats = get_json(base_url, "/v1/compaction/stats")
        except Exception:  # noqa: BLE001 - the server may be gone; the caller reports it
            return None
        if status == 200 and stats["totals"]["running_requests"] == 0:
            free = stats.get("pool", {}).get("free_pages")
            if last is not None and free == last.get("pool", {}).get("free_pages"):
                return stats
            last = stats
        time.sleep(1.0)
    return last


def preemptions(metrics_text: str) -> int | None:
    """vLLM's preemption counter from a /metrics page (summed over its label sets), None when absent."""
    values = [float(line.rsplit(None, 1)[1]) for line in metrics_text.splitlines()
              if line.startswith("vllm:num_preemptions") and not line.startswith("vllm:num_preemptions_created")]
    return int(sum(values)) if values else None


def read_preemptions(base_url: str) -> int | None:
    import httpx

    try:
        return preemptions(httpx.get(base_url + "/metrics", timeout=10).text)
    except (httpx.HTTPError, ValueError, IndexError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    exe = shutil.which("vllm-compact", path=str(Path(sys.executable).parent)) or "vllm-compact"
    return [exe, "serve", args.model, "--host", "127.0.0.1", "--port", str(port), "--kv-compaction",
            "--kv-compaction-trigger", str(args.trigger), "--kv-compaction-recent-window", str(args.recent_window),
            "--kv-compaction-pool-watermark", "1",  # a soak compacts every long request, memory short or not
            *shlex.split(args.server_args)]


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str, list[str]]:
    import httpx

    port = _free_port()
    cmd = server_command(args, port)
    env = {**os.environ, "VLLM_COMPACT_FAULTS": fault_switch(args),
           "HF_HUB_OFFLINE": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    print(f"starting the server (log: {log_path}): VLLM_COMPACT_FAULTS={env['VLLM_COMPACT_FAULTS']} "
          f"{shlex.join(cmd)}", file=sys.stderr)
    deadline = time.monotonic() + args.ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return process, base_url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    stop_server(process)
    raise RuntimeError(f"the server did not answer /health within {args.ready_timeout:.0f} s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def fault_switch(args) -> str:
    """The VLLM_COMPACT_FAULTS value the started server gets (core/faults.py)."""
    return f"rate={args.fault_rate},seed={args.fault_seed},sites={args.fault_sites}"


LOG_MARKERS = {
    "tracebacks": "Traceback (most recent call last)",
    "faults_raised": "InjectedFault: injected compaction fault",
    "non_finite_results": "FloatingPointError: ",
    "fallbacks_logged": "failed; falling back",
    "all_methods_failed": "RuntimeError: every compaction method failed",
    "left_uncompacted": "it stays uncompacted",
    "kept_newest_keys": "keeping its newest keys",
    "engine_dead": "EngineDeadError",
    "http_500_lines": '" 500 ',
}


def log_counts(log_path: Path, upto: int | None = None) -> dict:
    """Markers in the server's log up to byte `upto` (where it stood before we stopped it: stopping the server
    kills its engine, and vLLM then logs an EngineDeadError of its own shutdown)."""
    data = log_path.read_bytes() if log_path.is_file() else b""
    text = data[:upto].decode(errors="replace")
    return {name: text.count(marker) for name, marker in LOG_MARKERS.items()}
