"""A real `vllm-compact serve` on 127.0.0.1 for the live tests: started as its own process group, ready when
/health answers, stopped by signalling the whole group."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from vllm_compact.benchmarks.reliability.server import stop_server

# vLLM imports itself twice (API server, engine core); slow on a busy 2-core machine (raise it there with the env var)
READY_TIMEOUT_S = float(os.environ.get("VLLM_COMPACT_TEST_READY_TIMEOUT_S", "300"))
BASE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
BASE_ARGS = ["--dtype", "float32", "--enforce-eager", "--block-size", "32", "--max-model-len", "2048"]


@dataclass
class LiveServer:
    base_url: str
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(server: LiveServer) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s:\n{server.log_tail()}")


@contextmanager
def live_server(model: str, extra_args: list[str], log_dir: Path) -> Iterator[LiveServer]:
    exe = shutil.which("vllm-compact", path=str(Path(sys.executable).parent))
    port = free_port()
    log_path = log_dir / "server.log"
    cmd = [exe, "serve", model, "--host", "127.0.0.1", "--port", str(port), *BASE_ARGS, *extra_args]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **BASE_ENV},
                                   start_new_session=True)
    server = LiveServer(f"http://127.0.0.1:{port}", log_path, process)
    try:
        _wait_ready(server)
        yield server
    finally:
        stop_server(process)


# ---- the tiny compaction server shared by the live test modules (tests/serving/conftest.py) --------------------

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"  # --served-model-name
TRIGGER, RECENT = 64, 32
# Pool watermark 1: these servers have memory to spare and must still compact every request past the trigger.
SERVER_ARGS = ["--served-model-name", MODEL, "--api-key", KEY, "--max-num-seqs", "16", "--kv-compaction",
               "--kv-compaction-pool-watermark", "1",
               "--kv-compaction-trigger", str(TRIGGER), "--kv-compaction-recent-window", str(RECENT)]
NO_EOS = {"ignore_eos": True}  # a random model may stop at once; every answer with it has max_tokens tokens


def long_prompt(seed: int, words: int = 300) -> str:
    """~770 tokens of the tiny model's tokenizer: far past trigger + recent window."""
    return " ".join(f"w{(seed * 7 + j) % 50}" for j in range(words))


def stats(server) -> dict:
    r = requests.get(f"{server.base_url}/v1/compaction/stats", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def metric(server, name: str) -> float:
    text = requests.get(f"{server.base_url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not on /metrics"
    return float(found.group(1))


def kv(usage) -> dict:
    extra = usage.model_extra or {}
    assert "kv_compaction" in extra, f"usage without kv_compaction: {usage}"
    return extra["kv_compaction"]


def wait_idle(server, timeout_s: float = 30.0) -> dict:
    """Stats once no request runs; the KV pool must be empty again then (prefix caching is off with compaction)."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = stats(server)
        if current["totals"]["running_requests"] == 0 or time.monotonic() > deadline:
            return current
        time.sleep(0.2)
