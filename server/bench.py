"""`vllm-compact bench am|needle-serving|serving|reliability`: each benchmark writes JSON + markdown, with the
command that produced them, under bench/results/ (`vllm_compact.benchmarks.results`)."""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one line of help)
BENCHMARKS = {
    "needle-serving": ("vllm_compact.benchmarks.needle_serving",
                       "needle-in-a-haystack answers through a running server, per method and ratio"),
    "serving": ("vllm_compact.benchmarks.serving",
                "stock vLLM against vllm-compact under `vllm bench serve`: throughput, TTFT, ITL, memory"),
    "am": ("vllm_compact.benchmarks.am",
           "compaction quality (held-out attention error) and speed on a model's real KV tensors"),
    "reliability": ("vllm_compact.benchmarks.reliability.cli",
                    "soak: 1000+ requests (invalid ones, disconnects, injected faults) against a live server"),
}


def usage() -> str:
    lines = [f"usage: vllm-compact bench {{{','.join(BENCHMARKS)}}} [--help]", ""]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in BENCHMARKS.items()]
    lines += ["", "Head-budget tables: `vllm-compact calibrate MODEL` writes one, `--evaluate` compares one with "
              "uniform budgets."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        wanted = bool(argv) and argv[0] in ("-h", "--help")
        print(usage(), file=sys.stdout if wanted else sys.stderr)
        return 0 if wanted else 2
    module = importlib.import_module(BENCHMARKS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)
