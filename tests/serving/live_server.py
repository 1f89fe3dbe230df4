"""A real `vllm-compact serve` on 127.0.0.1 for the live tests: started as its own process group, ready when
/health answers, stopped by signalling the whole group."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

READY_TIMEOUT_S = 300  # vLLM imports itself twice (API server, engine core); slow on a busy 2-core machine
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


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


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
        _stop(process)
