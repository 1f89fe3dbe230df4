"""One engine job per process (`run_isolated`): compaction settings live in the process environment and vLLM keeps
global state, so every configuration gets a fresh interpreter. The engine itself is driven by
integration/offline.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_isolated(module: str, job: dict, timeout: float | None = None) -> dict:
    """Run `python -m module --job JSON --out FILE` in a fresh process and return the JSON it wrote."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-compact-job-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, "-m", module, "--job", json.dumps(job), "--out", str(out)]
    proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} job failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    try:
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
