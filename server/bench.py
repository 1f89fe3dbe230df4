"""`vllm-compact bench am|needle|needle-sources|needle-diagnosis|needle-serving|needle-replica|needle-kept|throughput|serving|reliability|head-budgets`: each benchmark writes JSON + markdown under bench/results/."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "am": "vllm_compact.benchmarks.am",
    "needle": "vllm_compact.benchmarks.needle",
    "needle-sources": "vllm_compact.benchmarks.needle_sources",
    "needle-diagnosis": "vllm_compact.benchmarks.needle_diagnosis",
    "needle-serving": "vllm_compact.benchmarks.needle_serving",
    "needle-replica": "vllm_compact.benchmarks.needle_replica",
    "needle-kept": "vllm_compact.benchmarks.needle_kept",
    "throughput": "vllm_compact.benchmarks.throughput",
    "serving": "vllm_compact.benchmarks.serving",
    "reliability": "vllm_compact.benchmarks.reliability.cli",
    "head-budgets": "vllm_compact.benchmarks.head_budgets",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: vllm-compact bench {am,needle,needle-sources,needle-diagnosis,needle-serving,needle-replica,needle-kept,throughput,serving,reliability,head-budgets} [--help]\n\n"
              "  am          compaction quality and speed on captured SmolLM2 tensors\n"
              "  needle      needle-in-a-haystack accuracy and log-perplexity through the engine\n"
              "  needle-sources  needle retention per reference-query source (after / repeat-prefill), offline\n"
              "  needle-diagnosis  where a needle's tokens go in one compaction (offline replica)\n"
              "  needle-serving  needle accuracy through a running server (make serve)\n"
              "  needle-replica  does the answer survive one compaction, per lever (offline replica)\n"
              "  needle-kept  which of a needle's tokens the served engine keeps, head by head\n"
              "  throughput  concurrent long requests with compaction off vs on\n"
              "  serving     stock vLLM vs vllm-compact servers under `vllm bench serve` (throughput, TTFT, ITL, RSS)\n"
              "  reliability  1000+ requests (bad ones, disconnects, injected faults) against a live server\n"
              "  head-budgets  uniform vs calibrated per-head budgets on held-out real tensors, offline",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return int(module.main(argv[1:]) or 0)
