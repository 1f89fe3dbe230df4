"""`vllm-compact bench am`: attention-matching quality and speed on real captured KV tensors.

Captures post-RoPE keys/values of an essay span and the queries of several reference sources from a real model,
compacts every (layer, KV head) with each method at each ratio, and measures the error of the span's attention
(local output and mass) on held-out queries that no method ever sees.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_compact.am import CompactedHeads, HeadBatch, attention_errors, compact_heads, uniform_budgets
from vllm_compact.benchmarks.capture import CapturedTensors, build_layout, capture, load_model
from vllm_compact.benchmarks.heldout import HeldoutReference, heldout_errors, heldout_reference
from vllm_compact.benchmarks.prefill import PrefillTiming, time_prefill_transformers, time_prefill_vllm
from vllm_compact.benchmarks.report import markdown, write_plot
from vllm_compact.benchmarks.results import ResultsFile, command_line
from vllm_compact.benchmarks.specs import SpecError, parse_options

# run order: the sources the design expects to work best first (rows arrive incrementally)
QUERY_SOURCES = ("after", "repeat", "context-causal", "context")
METHODS = ("none", "recent", "snapkv", "h2o", "am-highest-attention", "am-omp")
AM_METHODS = ("am-highest-attention", "am-omp")


@dataclass
class Row:
    method: str
    ratio: float
    queries: str
    output_rel_err: float  # mean over heads
    mass_rel_err: float
    compact_seconds: float  # one compact_heads call on all heads
    prefill_seconds: float
    output_rel_err_median: float
    mass_rel_err_median: float
    output_rel_err_max: float
    fell_back_fraction: float
    compact_entries: int  # total kept entries over all heads
    reference_queries: int  # per KV head


@dataclass
class Skipped:
    method: str
    ratio: float
    queries: str
    reason: str


@dataclass
class Target:
    name: str
    passed: bool
    detail: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-compact bench am",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", default="smollm2-135m", help="registry model name (vllm_compact.models.registry.ensure_model)")
    add("--span-tokens", type=int, default=4096, help="tokens of the compacted span (the cache being compacted)")
    add("--after-tokens", type=int, default=256, help="tokens right after the span (the `after` query source)")
    add("--heldout-tokens", type=int, default=512, help="tokens after those, whose queries only evaluate")
    add("--repeat-tokens", type=int, default=1024,
        help="span tokens teacher-forced again after the repeat instruction (the `repeat` source), capped at span")
    add("--layers", type=int, nargs="*", default=None, help="layer indices to capture (none given: every layer)")
    add("--queries", nargs="+", default=list(QUERY_SOURCES), choices=QUERY_SOURCES,
        help="reference query sources to fit on: context = the span's own queries scored non-causally; "
        "context-causal = the same with the causal mask; after = the tokens right after the span; "
        "repeat = repeat-prefill of the span on top of its cache")
    add("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="compaction methods")
    add("--ratios", type=float, nargs="+", default=[2, 5, 10, 20, 50], help="compaction ratios T/t")
    add("--omp-ratios", type=float, nargs="*", default=[10, 20, 50],
        help="ratios at which am-omp runs (it is much slower, worst at low ratios); others are reported skipped")
    add("--omp-budget", type=float, default=1800.0,
        help="seconds of am-omp compaction in all; an am-omp run whose predicted time (the previous am-omp run's, "
        "scaled by the budget ratio) does not fit in what is left is skipped and listed as skipped")
    add("--time-limit", type=float, default=0.0,
        help="seconds for the whole benchmark (0 = none); runs not started within it are listed as skipped")
    add("--omp-queries", nargs="*", default=None, choices=QUERY_SOURCES,
        help="query sources for am-omp (none given: all of --queries)")
    add("--max-queries", type=int, default=1024,
        help="cap the reference queries per KV head (evenly strided subsample; 0 = keep all). Equal counts make "
        "the sources comparable; a solve's time grows with the count")
    add("--option", action="append", default=[], metavar="KEY=VALUE",
        help="option of the am-* methods (their dataclass fields, e.g. refit_values=false; repeatable; the value "
        "is read as JSON where it parses, else as a string: vllm_compact.benchmarks.specs)")
    add("--prefill-engine", choices=("vllm", "transformers"), default="vllm",
        help="what times the span prefill; vllm falls back to transformers if it cannot run")
    add("--out", type=Path, default=Path("bench/results/am.json"),
        help="JSON rows; the markdown (.md) and plot (.png) go beside it")
    add("--seed", type=int, default=0, help="torch seed (methods with randomness)")
    return parser


def _strided(tensor: torch.Tensor, positions: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly strided subsample of the query axis (dim 2 of [L, Hkv, N, D]) down to `cap` queries."""
    n = tensor.shape[2]
    if cap <= 0 or n <= cap:
        return tensor, positions
    keep = torch.linspace(0, n - 1, cap).round().long()
    return tensor[:, :, keep], positions[keep]


def reference_queries(cap: CapturedTensors, source: str, max_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, N, D] queries of a source (H = layers x KV heads) and their [N] positions."""
    name = "context" if source == "context-causal" else source
    queries, positions = _strided(cap.queries[name], cap.query_positions[name], max_queries)
    return queries.flatten(0, 1), positions


def build_batch(cap: CapturedTensors, source: str, ratio: float, max_queries: int) -> HeadBatch:
    keys = cap.keys.flatten(0, 1)
    heads, span = keys.shape[0], keys.shape[1]
    queries, positions = reference_queries(cap, source, max_queries)
    causal = source == "context-causal"
    key_len = torch.full((heads,), span, dtype=torch.long)
    return HeadBatch(
        keys=keys,
        values=cap.values.flatten(0, 1),
        queries=queries,
        scale=cap.scale,
        budget=uniform_budgets(key_len, ratio),
        key_len=key_len,
        query_pos=positions.expand(heads, -1).contiguous() if causal else None,
        key_pos=torch.arange(span).expand(heads, -1).contiguous() if causal else None,
    )


def run_one(cap: CapturedTensors, source: str, method: str, ratio: float, args, options: dict,
            reference: HeldoutReference, prefill: PrefillTiming) -> tuple[Row, HeadBatch, CompactedHeads]:
    batch = build_batch(cap, source, ratio, args.max_queries)
    method_options = options if method in AM_METHODS else {}
    started = time.perf_counter()
    compacted = compact_heads(batch, method, **method_options)
    compact_seconds = time.perf_counter() - started
    errors = heldout_errors(reference, compacted)
    out, mass = errors["output_rel_err"], errors["mass_rel_err"]
    row = Row(
        method=method,
        ratio=ratio,
        queries=source,
        output_rel_err=float(out.mean()),
        mass_rel_err=float(mass.mean()),
        compact_seconds=compact_seconds,
        prefill_seconds=prefill.seconds,
        output_rel_err_median=float(out.median()),
        mass_rel_err_median=float(mass.median()),
        output_rel_err_max=float(out.max()),
        fell_back_fraction=float(compacted.fell_back.float().mean()),
        compact_entries=int(compacted.length.sum()),
        reference_queries=int(batch.queries.shape[1]),
    )
    return row, batch, compacted


def metric_cross_check(batch: HeadBatch, compacted: CompactedHeads, reference: HeldoutReference, row: Row) -> dict:
    """Largest per-head difference between the cached evaluation and am.attention_errors on one run."""
    ours = heldout_errors(reference, compacted)
    theirs = attention_errors(batch.keys, batch.values, batch.key_len, None, compacted,
                              reference.queries, None, batch.scale)
    return {
        "run": f"{row.method} {row.ratio:g}x queries={row.queries}",
        **{f"max_abs_diff_{key}": float((ours[key] - theirs[key].double()).abs().max()) for key in ours},
    }


Run = tuple[str, str, float]  # (query source, method, ratio)
TARGET_RATIOS = (10.0, 20.0)
TARGET_METHODS = ("snapkv", "am-highest-attention")


def plan_runs(args) -> tuple[list[Run], list[Run], list[Skipped]]:
    """(runs without am-omp, am-omp runs, runs not made). `none` keeps every key, so it runs once (ratio 1)."""
    runs, omp_runs, skipped = [], [], []
    omp_sources = set(args.omp_queries if args.omp_queries else args.queries)
    for source in args.queries:
        for method in args.methods:
            for ratio in [1.0] if method == "none" else args.ratios:
                if method != "am-omp":
                    runs.append((source, method, ratio))
                elif ratio not in args.omp_ratios:
                    skipped.append(Skipped(method, ratio, source, "ratio not in --omp-ratios (time budget)"))
                elif source not in omp_sources:
                    skipped.append(Skipped(method, ratio, source, "source not in --omp-queries (time budget)"))
                else:
                    omp_runs.append((source, method, ratio))
    return runs, omp_runs, skipped


def target_first(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """(the runs the targets compare: snapkv and am-highest-attention at 10x/20x, every other run)."""
    first = [run for run in runs if run[1] in TARGET_METHODS and run[2] in TARGET_RATIOS]
    return first, [run for run in runs if run not in first]


def omp_order(omp_runs: list[Run], best: str | None) -> tuple[list[Run], list[Run]]:
    """(am-omp runs on the best source, on the others), each with high ratios (fewest OMP steps) first."""
    ordered = sorted(omp_runs, key=lambda run: -run[2])
    return [run for run in ordered if run[0] == best], [run for run in ordered if run[0] != best]


def _find(rows: list[Row], method: str, ratio: float, source: str) -> Row | None:
    return next((r for r in rows if (r.method, r.ratio, r.queries) == (method, ratio, source)), None)


def best_source(rows: list[Row], ratios: tuple[float, ...]) -> str | None:
    """The query source with the lowest mean am-highest-attention held-out output error over `ratios`."""
    scores = {}
    for source in {r.queries for r in rows}:
        found = [_find(rows, "am-highest-attention", ratio, source) for ratio in ratios]
        if all(found):
            scores[source] = sum(r.output_rel_err for r in found) / len(found)
    return min(scores, key=scores.get) if scores else None


def _target_error_vs_snapkv(rows: list[Row], source: str) -> Target:
    parts, ok = [], True
    for ratio in TARGET_RATIOS:
        am, snap = _find(rows, "am-highest-attention", ratio, source), _find(rows, "snapkv", ratio, source)
        if am is None or snap is None:
            ok = False
            parts.append(f"{ratio:g}x: am-highest-attention or snapkv row missing")
            continue
        quotient = am.output_rel_err / snap.output_rel_err
        ok = ok and quotient <= 0.5
        parts.append(f"{ratio:g}x: {am.output_rel_err:.4f} vs snapkv {snap.output_rel_err:.4f} ({quotient:.2f}x)")
    return Target(f"am-highest-attention output error <= 0.5x snapkv's at 10x and 20x (queries={source})",
                  ok, "; ".join(parts))


def _target_omp_mass(rows: list[Row], source: str) -> Target:
    parts, ok = [], True
    for omp in (r for r in rows if r.method == "am-omp" and r.queries == source):
        am = _find(rows, "am-highest-attention", omp.ratio, source)
        if am is not None:
            ok = ok and omp.mass_rel_err < am.mass_rel_err
            parts.append(f"{omp.ratio:g}x: {omp.mass_rel_err:.4f} vs {am.mass_rel_err:.4f}")
    return Target(f"am-omp mass error < am-highest-attention's (queries={source})",
                  ok and bool(parts), "; ".join(parts) or "no am-omp row with an am-highest-attention row beside it")


def _target_compaction_time(rows: list[Row], source: str, timing: dict | None) -> Target:
    name = f"am-highest-attention compaction at 10x <= 25% of prefill (queries={source})"
    if timing:  # measured back to back at the end: both sides see the same machine load
        compact, prefill, how = timing["compact_seconds"], timing["prefill_seconds"], " (timed back to back)"
    else:
        am = _find(rows, "am-highest-attention", 10.0, source)
        if am is None:
            return Target(name, False, "no am-highest-attention row at 10x")
        compact, prefill, how = am.compact_seconds, am.prefill_seconds, ""
    share = compact / prefill
    return Target(name, share <= 0.25, f"{compact:.2f} s vs prefill {prefill:.2f} s ({share:.0%}){how}")


def check_targets(rows: list[Row], timing: dict | None = None) -> list[Target]:
    """The three targets, judged on the query source where am-highest-attention does best at 10x/20x."""
    source = best_source(rows, TARGET_RATIOS) or (rows[0].queries if rows else "-")
    return [_target_error_vs_snapkv(rows, source), _target_omp_mass(rows, source),
            _target_compaction_time(rows, source, timing)]


def timing_check(cap: CapturedTensors, source: str, args, options: dict,
                 prefill_again: Callable[[], PrefillTiming]) -> dict:
    """Span prefill and the am-highest-attention 10x compaction of all heads, timed one right after the other."""
    prefill = prefill_again()
    batch = build_batch(cap, source, 10.0, args.max_queries)
    started = time.perf_counter()
    compact_heads(batch, "am-highest-attention", **options)
    return {"queries": source, "prefill_seconds": prefill.seconds, "prefill_engine": prefill.engine,
            "compact_seconds": time.perf_counter() - started}


def measure_prefill(args, model_dir: Path, model, span_ids: torch.Tensor) -> PrefillTiming:
    if args.prefill_engine == "vllm":
        try:
            return time_prefill_vllm(model_dir, span_ids)
        except Exception as error:  # noqa: BLE001 - any engine failure falls back, and is reported
            fallback = time_prefill_transformers(model, span_ids)
            fallback.note += f"; vLLM failed: {str(error)[-300:]}"
            return fallback
    return time_prefill_transformers(model, span_ids)


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} torch threads, " \
        f"{platform.system()} {platform.release()}, torch {torch.__version__}".replace("  ", " ")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        options = parse_options(args.option)  # read as JSON: they apply to every AM method
    except SpecError as e:
        print(f"vllm-compact bench am: error: --option: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    from vllm_compact.data.essays import essay_text
    from vllm_compact.models.registry import ensure_model

    model_dir = ensure_model(args.model)
    model, tokenizer = load_model(model_dir)
    layers = args.layers if args.layers else list(range(model.config.num_hidden_layers))
    layout = build_layout(tokenizer, essay_text(), args.span_tokens, args.after_tokens, args.heldout_tokens,
                          args.repeat_tokens)
    cap = capture(model, layout, layers)
    print(f"captured {len(layers)} layers x {cap.keys.shape[1]} KV heads, span {cap.span_tokens} "
          f"in {cap.seconds:.1f} s", flush=True)
    prefill = measure_prefill(args, model_dir, model, layout.span)
    print(f"prefill of {cap.span_tokens} tokens: {prefill.seconds:.3f} s ({prefill.engine})", flush=True)
    reference = heldout_reference(cap.keys.flatten(0, 1), cap.values.flatten(0, 1),
                                  cap.queries["heldout"].flatten(0, 1), cap.scale)
    meta = {
        "command": command_line("vllm-compact", "bench", "am", *argv),
        "machine": _machine(),
        "model": args.model,
        "span_tokens": cap.span_tokens,
        "after_tokens": args.after_tokens,
        "heldout_tokens": args.heldout_tokens,
        "repeat_tokens": min(args.repeat_tokens, cap.span_tokens),
        "layers": layers,
        "kv_heads_per_layer": int(cap.keys.shape[1]),
        "query_heads_per_kv_head": cap.group_size,
        "scale": cap.scale,
        "heldout_queries_per_head": int(reference.queries.shape[1]),
        "max_queries": args.max_queries,
        "am_options": options,
        "capture_seconds": cap.seconds,
        "prefill_seconds": prefill.seconds,
        "prefill_engine": prefill.engine,
        "prefill_note": prefill.note,
        "metric_cross_check": {},
        "total_seconds": 0.0,
    }
    runs, omp_runs, skipped = plan_runs(args)
    rows: list[Row] = []
    progress = tqdm(total=len(runs) + len(omp_runs), desc="bench am", unit="run")
    omp_spent, omp_last = 0.0, None  # seconds of am-omp so far; (ratio, seconds) of the last am-omp run

    def skip_reason(method: str, ratio: float) -> str | None:
        if args.time_limit and time.perf_counter() - started > args.time_limit:
            return f"--time-limit of {args.time_limit:g} s reached"
        if method == "am-omp" and omp_last is not None:
            predicted = omp_last[1] * omp_last[0] / ratio  # OMP steps grow with the budget T/ratio
            if omp_spent + predicted > args.omp_budget:
                return f"predicted {predicted:.0f} s does not fit in what is left of --omp-budget {args.omp_budget:g} s"
            if args.time_limit and time.perf_counter() - started + predicted > args.time_limit:
                return f"predicted {predicted:.0f} s does not fit in what is left of --time-limit {args.time_limit:g} s"
        return None

    def execute(source: str, method: str, ratio: float) -> None:
        nonlocal omp_spent, omp_last
        reason = skip_reason(method, ratio)
        if reason:
            skipped.append(Skipped(method, ratio, source, reason))
        else:
            row, batch, compacted = run_one(cap, source, method, ratio, args, options, reference, prefill)
            rows.append(row)
            if method == "am-omp":
                omp_spent, omp_last = omp_spent + row.compact_seconds, (ratio, row.compact_seconds)
            if not meta["metric_cross_check"] and method != "none":
                meta["metric_cross_check"] = metric_cross_check(batch, compacted, reference, row)
        progress.update()
        meta["total_seconds"] = time.perf_counter() - started
        # written after every run: a long run that is stopped still leaves its finished rows
        write_results(args.out, meta, rows, skipped, check_targets(rows))

    # order: what the targets need first, so that a --time-limit cuts the least informative runs
    target_runs, other_runs = target_first(runs)
    for run in target_runs:
        execute(*run)
    omp_best, omp_other = omp_order(omp_runs, best_source(rows, TARGET_RATIOS))  # best source known only now
    for run in omp_best + other_runs + omp_other:
        execute(*run)
    progress.close()
    source = best_source(rows, TARGET_RATIOS)
    if source is not None and not (args.time_limit and time.perf_counter() - started > args.time_limit):
        meta["timing_check"] = timing_check(cap, source, args, options,
                                            lambda: measure_prefill(args, model_dir, model, layout.span))
    meta["total_seconds"] = time.perf_counter() - started
    targets = check_targets(rows, meta.get("timing_check"))
    write_results(args.out, meta, rows, skipped, targets)
    for target in targets:
        print(f"{'PASS' if target.passed else 'FAIL'}: {target.name}: {target.detail}")
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')} "
          f"({meta['total_seconds']:.0f} s)")
    return 0


def write_results(out: Path, meta: dict, rows: list[Row], skipped: list[Skipped], targets: list[Target]) -> None:
    sources = list(dict.fromkeys(r.queries for r in rows))
    ordered = sorted(rows, key=lambda r: (sources.index(r.queries), METHODS.index(r.method), r.ratio))
    document = {
        "command": meta["command"],
        "meta": meta,
        "rows": [asdict(r) for r in ordered],
        "skipped": [asdict(s) for s in skipped],
        "targets": [asdict(t) for t in targets],
    }
    ResultsFile(out).write(document, markdown(meta, document["rows"], document["skipped"], document["targets"]))
    write_plot(out.with_suffix(".png"), document["rows"])


if __name__ == "__main__":
    sys.exit(main())
