"""`vllm-compact` command: serve, models, data, bench, calibrate.

Each subcommand lives in its own module with `main(argv) -> int`, imported lazily so that `vllm-compact models`
never pays for importing vLLM.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "serve": ("vllm_compact.server.serve", "start vLLM's OpenAI-compatible server with KV compaction flags"),
    "models": ("vllm_compact.models.cli", "list, fetch and locate the models this project ships converters for"),
    "data": ("vllm_compact.data.cli", "long-context data: essays, SQuAD, HotpotQA, needle-in-a-haystack prompts"),
    "bench": ("vllm_compact.server.bench", "benchmarks: needle answers through a server, serving against stock vLLM, AM quality, soak"),
    "calibrate": ("vllm_compact.calibration.cli", "measure a per-(layer, KV head) budget table for a model on real text, or evaluate one"),
}


def _usage() -> str:
    lines = ["usage: vllm-compact <command> [args]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `vllm-compact <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from vllm_compact import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"vllm-compact: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
