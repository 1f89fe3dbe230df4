"""Wall time of prefilling the span: the yardstick the compaction time is compared against.

vLLM runs in a child process (`python -m vllm_compact.benchmarks.prefill ...`) so its engine, threads and
environment never leak into the benchmark; if it cannot run, the transformers forward is timed instead and the
engine used is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class PrefillTiming:
    seconds: float  # median over the timed repetitions
    engine: str  # "vllm" | "transformers"
    note: str = ""


def time_prefill_transformers(model, span_ids: torch.Tensor, repeats: int = 3) -> PrefillTiming:
    """Median wall time of one no-cache forward of the span through the given (fp32, CPU) transformers model."""
    timings = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first run warms up allocators
            started = time.perf_counter()
            model(input_ids=span_ids.unsqueeze(0), use_cache=True)
            timings.append(time.perf_counter() - started)
    dtype = next(model.parameters()).dtype
    return PrefillTiming(statistics.median(timings[1:]), "transformers", f"{dtype}, sdpa, CPU")


def time_prefill_vllm(model_dir: Path, span_ids: torch.Tensor, repeats: int = 3, timeout_s: float = 900.0) -> PrefillTiming:
    """Median prefill time of the span in a fresh in-process vLLM engine (child process). Raises on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = Path(tmp) / "span.json"
        result_file = Path(tmp) / "result.json"
        tokens_file.write_text(json.dumps(span_ids.tolist()))
        env = dict(os.environ)
        env.update(
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            VLLM_TARGET_DEVICE="cpu",
            HF_HUB_OFFLINE="1",
            # plain vLLM: the project's own plugin is not what is being timed
            VLLM_PLUGINS="",
        )
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        command = [sys.executable, "-m", "vllm_compact.benchmarks.prefill", "--model", str(model_dir),
                   "--tokens", str(tokens_file), "--repeats", str(repeats), "--result", str(result_file)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not result_file.exists():
            raise RuntimeError(f"vLLM prefill timing failed (rc {done.returncode}): {done.stderr[-2000:]}")
        result = json.loads(result_file.read_text())
    return PrefillTiming(result["seconds"], "vllm", result["note"])


def _vllm_child(model_dir: str, tokens: list[int], repeats: int) -> dict:
    from vllm_compact.integration.offline import sampling_params, stock_engine, token_prompt

    span = len(tokens)
    llm = stock_engine(
        model_dir,
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=span + 16,
        max_num_batched_tokens=span + 16,  # the whole span in one prefill step
        max_num_seqs=1,
    )
    sampling = sampling_params(max_tokens=1, temperature=0.0)
    timings = []
    for attempt in range(repeats + 1):  # attempt 0 warms up
        prompt = token_prompt(tokens[attempt:] + tokens[:attempt])
        started = time.perf_counter()
        llm.generate([prompt], sampling, use_tqdm=False)
        timings.append(time.perf_counter() - started)
    dtype = str(llm.llm_engine.model_config.dtype)
    return {"seconds": statistics.median(timings[1:]), "note": f"vLLM {dtype}, enforce_eager, 1 prefill step + 1 token"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Child process: time vLLM prefill of a token list.")
    parser.add_argument("--model", required=True, help="HF model folder")
    parser.add_argument("--tokens", required=True, help="JSON list of prompt token ids")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after one warm-up")
    parser.add_argument("--result", required=True, help="where to write {seconds, note} as JSON")
    args = parser.parse_args(argv)
    result = _vllm_child(args.model, json.loads(Path(args.tokens).read_text()), args.repeats)
    Path(args.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
