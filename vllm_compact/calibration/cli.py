"""The `vllm-compact calibrate` command: arguments, the calibration run, the table file and its summary."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vllm_compact import calibration
from vllm_compact.calibration.allocation import proportions_from_curves, proportions_from_errors
from vllm_compact.calibration.capture import Layout, grid_budgets, measure
from vllm_compact.calibration.evaluate import SHIPPED, evaluate
from vllm_compact.calibration.memory import compare_memory, mean_coverage, mean_error
from vllm_compact.calibration.objectives import OBJECTIVES

FORMAT_VERSION = 1


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


def _fraction(low_open: bool):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (0.0 < value < 1.0 if low_open else 0.0 <= value <= 1.0) or math.isnan(value):
            raise argparse.ArgumentTypeError(f"{value} must be in {'(0, 1)' if low_open else '[0, 1]'}")
        return value

    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 1.0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    summary = calibration.__doc__.split("\n\n", 1)[0]  # the package docstring explains the method
    p = argparse.ArgumentParser(
        prog="vllm-compact calibrate",
        description=summary + "\n\n" + calibration.__doc__.split("\n\n", 1)[1]
        + "\nThe output is the head-budget file format ({\"proportions\": [[p per KV head] per layer]}, plus the "
        "measurements), usable with `vllm-compact serve ... --kv-compaction-head-budgets FILE`. Tables for "
        "smollm2-135m and qwen2.5-0.5b ship with the package and are used by default for those models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="a name of `vllm-compact models list` (fetched on first use) or a Hugging Face "
                                 "model folder")
    p.add_argument("--out", "-o", default=None,
                   help="output JSON file (default: ./<model>-head-budgets.json, with --evaluate "
                        "./<model>-head-budgets-evaluation.json and its .md; '-' for stdout when calibrating)")
    p.add_argument("--evaluate", nargs="?", const=SHIPPED, default=None, metavar="TABLE",
                   help="instead of calibrating, compare uniform budgets with the head-budget file TABLE (without "
                        "TABLE: the one shipped for the model) on held-out contexts from the last tenth of the "
                        "essays, with --method at each --ratios: held-out output and mass error, kept attention "
                        "mass, pages (vllm_compact.calibration.evaluate)")
    p.add_argument("--contexts", type=_positive_int, default=8, help="essay contexts averaged (default: 8)")
    p.add_argument("--span", type=_positive_int, default=2048,
                   help="tokens of the compacted span per context, the protected head included (default: 2048)")
    p.add_argument("--protected", type=_nonnegative_int, default=128,
                   help="leading tokens left out of the span (attention sinks; the engine keeps whole blocks, so "
                        "its 4 protected tokens are one 128-token block on vLLM's CPU default) (default: 128)")
    p.add_argument("--recent", type=_positive_int, default=256,
                   help="tokens after the span whose queries the method is fitted on (the engine's recent window, "
                        "its reference queries) (default: 256)")
    p.add_argument("--window", type=_positive_int, default=256,
                   help="held-out tokens after the recent window whose queries score each head (default: 256)")
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default="output-error",
                   help="'output-error': the exchange on each head's held-out AM output error at the --grid "
                        "ratios (default); 'coverage': the greedy on held-out attention coverage (no AM solves: "
                        "one forward per context)")
    p.add_argument("--grid", type=_ratio, nargs="+", default=[2.5, 5.0, 10.0, 20.0, 40.0],
                   help="ratios at which every head's error is measured (default: 2.5 5 10 20 40)")
    p.add_argument("--method", default="am-highest-attention",
                   help="compaction method of the error objective, with the engine's default options "
                        "(default: am-highest-attention)")
    p.add_argument("--ratios", type=_ratio, nargs="+", default=[5.0, 10.0, 20.0],
                   help="target ratios the allocation is averaged over (default: 5 10 20)")
    p.add_argument("--floor", type=_fraction(False), default=0.25,
                   help="every head's minimum, as a fraction of the uniform budget at each ratio (default: 0.25)")
    p.add_argument("--share", type=_fraction(True), default=0.9,
                   help="share of the held-out mass for the keys_needed diagnostic (default: 0.9)")
    p.add_argument("--scope", choices=("layer", "model"), default="layer",
                   help="'layer': budget moves only among a layer's KV heads, pages equal uniform's (default); "
                        "'model': across layers too, the fullest layer then costs extra pages (reported)")
    p.add_argument("--report-ratio", type=_ratio, default=10.0, help="ratio of the memory report (default: 10)")
    p.add_argument("--report-span", type=_positive_int, default=None,
                   help="span tokens of the memory report (default: --span minus --protected)")
    p.add_argument("--block-size", type=_positive_int, default=128,
                   help="KV page size of the memory report (default: 128, vLLM's CPU default)")
    p.add_argument("--facts", type=_nonnegative_int, default=0,
                   help="facts planted in each context's span, their questions and answers the held-out window "
                        "(calibration.facts: scores the heads that read a fact back); 0: essay text after the "
                        "recent window (default: 0)")
    p.add_argument("--text", default=None,
                   help="a UTF-8 text file to calibrate on instead of the essays (vllm_compact/data/essays.py)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve_model(name: str) -> tuple[str, Path]:
    from vllm_compact.models import registry

    path = Path(name)
    if path.is_dir():
        return path.name, path
    if name in registry.MODELS:
        return name, registry.ensure_model(name)
    raise FileNotFoundError(f"{name!r} is neither a model folder nor one of: {', '.join(registry.MODELS)}")


def calibrate(args: argparse.Namespace) -> dict:
    import torch

    from vllm_compact.benchmarks.capture import load_model
    from vllm_compact.head_table import model_fingerprint, read_model_config

    if args.threads:
        torch.set_num_threads(args.threads)
    name, model_dir = _resolve_model(args.model)
    layout = Layout(args.protected, args.span, args.recent, args.window)
    if args.text is not None:
        text = Path(args.text).read_text(encoding="utf-8")
    else:
        from vllm_compact.data.essays import essay_text

        text = essay_text()
    from vllm_compact.config import CompactionConfig

    options = CompactionConfig().method_options(args.method)  # the engine's defaults for the method
    model, tokenizer = load_model(model_dir)
    counts, curves, errors, seconds = measure(
        model, tokenizer, text, layout, args.contexts, args.share, progress=not args.no_progress,
        objective=args.objective, grid=args.grid, method=args.method, method_options=options, facts=args.facts)
    span_keys = args.span - args.protected
    budgets = grid_budgets(span_keys, args.grid)
    if errors is not None:
        table = proportions_from_errors(errors, budgets, span_keys, args.ratios, args.floor, args.scope)
    else:
        table = proportions_from_curves(curves, args.ratios, args.floor, args.scope)
    rows = [[round(float(v), 8) for v in row] for row in table]
    memory = compare_memory(rows, args.report_span or span_keys, args.report_ratio, args.block_size)
    return {
        "proportions": rows,
        "model": name,
        "fingerprint": model_fingerprint(read_model_config(model_dir) or {}),
        "method": OBJECTIVES[args.objective],
        "format_version": FORMAT_VERSION,
        "scope": args.scope,
        "settings": {
            "contexts": args.contexts, "span": args.span, "protected": args.protected, "recent": args.recent,
            "window": args.window, "facts": args.facts, "share": args.share, "floor": args.floor, "ratios": args.ratios,
            "text": args.text or "essays", "objective": args.objective, "grid": args.grid,
            "compaction_method": args.method, "compaction_options": options,
        },
        "keys_needed": counts.tolist(),
        "span_keys": span_keys,
        # held-out mass the kept keys hold at the uniform 10x budget, per head
        "coverage_at_uniform_10x": [[round(float(c[max(1, round(span_keys / 10)) - 1]), 4) for c in layer]
                                    for layer in curves],
        # mean over heads (calibration contexts) with the engine's budgets, uniform vs this table
        "mean_coverage": {f"{ratio:g}": {name: round(mean_coverage(curves, rows if name == "calibrated" else None,
                                                                   ratio), 4)
                                         for name in ("uniform", "calibrated")} for ratio in args.ratios},
        **({"grid_budgets": budgets,
            "output_error": [[[round(float(e), 5) for e in head] for head in layer] for layer in errors],
            "mean_error": {f"{ratio:g}": {name: round(mean_error(errors, budgets, span_keys,
                                                                  rows if name == "calibrated" else None, ratio), 5)
                                          for name in ("uniform", "calibrated")} for ratio in args.ratios}}
           if errors is not None else {}),
        "memory": memory,
        "seconds": round(seconds, 1),
    }


def dumps_table(result: dict) -> str:
    """JSON with one line per top-level key and per layer row (readable diffs of shipped tables)."""
    lines = []
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            rows = ",\n".join("  " + json.dumps(row) for row in value)
            lines.append(f" {json.dumps(key)}: [\n{rows}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _summary(result: dict) -> str:
    counts = result["keys_needed"]
    flat = sorted(c for row in counts for c in row)
    mem = result["memory"]
    uni, cal = mem["uniform"], mem["calibrated"]
    lines = [
        f"{result['model']}: {len(counts)} layers x {len(counts[0])} KV heads, {result['settings']['contexts']} "
        f"contexts in {result['seconds']} s; keys for {result['settings']['share']:.0%} of the held-out mass over "
        f"{result['span_keys']} span keys: min {flat[0]}, median {flat[len(flat) // 2]}, max {flat[-1]}",
        "held-out mass kept, mean over heads (calibration contexts), uniform -> calibrated: " + ", ".join(
            f"{r}x {v['uniform']:.3f} -> {v['calibrated']:.3f}" for r, v in result["mean_coverage"].items()),
        *(["held-out AM output error, mean over heads (calibration contexts, interpolated), uniform -> calibrated: "
           + ", ".join(f"{r}x {v['uniform']:.4f} -> {v['calibrated']:.4f}" for r, v in result["mean_error"].items())]
          if "mean_error" in result else []),
        f"memory at ratio {uni['ratio']:g}, span {uni['span_tokens']}, block {uni['block_size']} "
        f"(scope {result['scope']}):",
        f"  uniform:    {uni['pages']} pages = {uni['physical_tokens']} physical tokens per layer lane, "
        f"{uni['entries']} entries, per-layer totals {min(uni['layer_totals'])}..{max(uni['layer_totals'])}",
        f"  calibrated: {cal['pages']} pages = {cal['physical_tokens']} physical tokens per layer lane, "
        f"{cal['entries']} entries, per-layer totals {min(cal['layer_totals'])}..{max(cal['layer_totals'])}, "
        f"heads {cal['min_head']}..{cal['max_head']} entries",
    ]
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    from vllm_compact.benchmarks.results import ResultsFile, command_line

    if args.evaluate != SHIPPED and not Path(args.evaluate).is_file():
        print(f"vllm-compact calibrate: error: --evaluate {args.evaluate!r} is not a file", file=sys.stderr)
        return 2
    args.command = command_line("vllm-compact", "calibrate", *argv)
    try:
        name, model_dir = _resolve_model(args.model)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        evaluated = evaluate(args, name, model_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"vllm-compact calibrate: error: {e}", file=sys.stderr)
        return 2
    if evaluated is None:
        print(f"vllm-compact calibrate: error: no head-budget table ships for {name}; pass --evaluate TABLE",
              file=sys.stderr)
        return 2
    results = ResultsFile(args.out or f"{name}-head-budgets-evaluation.json")
    results.write(*evaluated)
    print(results.markdown_path.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)  # bad arguments: argparse exits 2 with the reason
    if args.protected >= args.span:
        parser.error(f"--protected ({args.protected}) must be smaller than --span ({args.span})")
    from vllm_compact.am.methods import METHODS

    if args.method not in METHODS:
        parser.error(f"--method {args.method!r} is not one of {', '.join(METHODS)}")
    if args.text is not None and not Path(args.text).is_file():
        parser.error(f"--text {args.text!r} is not a file")
    if args.evaluate is not None:
        return _evaluate(args, argv)
    try:
        result = calibrate(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"vllm-compact calibrate: error: {e}", file=sys.stderr)
        return 2
    text = dumps_table(result)
    out = args.out or f"{result['model']}-head-budgets.json"
    if out == "-":
        sys.stdout.write(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(_summary(result), file=sys.stderr)
    if out != "-":
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
