"""Markdown page and the error-vs-ratio plot of `bench am` (rows, skipped runs and targets as plain dicts)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _cell(row: dict | None, key: str) -> str:
    return "-" if row is None else f"{row[key]:.4f}"


def _table(rows: list[dict], source: str, key: str, methods: list[str], ratios: list[float]) -> list[str]:
    lookup = {(r["method"], r["ratio"]): r for r in rows if r["queries"] == source}
    lines = ["| method | " + " | ".join(f"{ratio:g}x" for ratio in ratios) + " |",
             "| --- |" + " ---: |" * len(ratios)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(_cell(lookup.get((method, ratio)), key) for ratio in ratios) + " |")
    return lines


def _header(meta: dict) -> list[str]:
    layers = meta["layers"]
    layer_text = f"{len(layers)} layers" + ("" if layers == list(range(len(layers))) else f" {layers}")
    return [
        "# Attention Matching benchmark (`bench am`)",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- model: {meta['model']} ({layer_text} x {meta['kv_heads_per_layer']} KV heads, "
        f"{meta['query_heads_per_kv_head']} query heads per KV head, scale {meta['scale']:.4f})",
        f"- span: {meta['span_tokens']} essay tokens; `after` = the next {meta['after_tokens']} tokens; held-out = "
        f"the {meta['heldout_tokens']} tokens after those ({meta['heldout_queries_per_head']} pooled queries per KV "
        f"head, never used for fitting); `repeat` = {meta['repeat_tokens']} span tokens teacher-forced after the "
        "repeat instruction",
        f"- reference queries per KV head capped at: {meta['max_queries'] or 'no cap'}; am options: "
        f"{meta['am_options'] or 'defaults'}",
        f"- capture {meta['capture_seconds']:.1f} s; span prefill {meta['prefill_seconds']:.3f} s "
        f"({meta['prefill_engine']}: {meta['prefill_note']}); total run {meta['total_seconds']:.0f} s",
        *_timing_line(meta),
        "- errors are means over all heads of the span-restricted attention on held-out queries: output = "
        "||O_c - O||/||O||, mass = mean |M_c - M|/M; compact s = one compact_heads call on all heads",
    ]


def _timing_line(meta: dict) -> list[str]:
    timing = meta.get("timing_check")
    if not timing:
        return []
    return [f"- timing check at the end, back to back (queries={timing['queries']}): span prefill "
            f"{timing['prefill_seconds']:.3f} s ({timing['prefill_engine']}), am-highest-attention 10x compaction of "
            f"all heads {timing['compact_seconds']:.2f} s; per-row compact/prefill seconds were taken at different "
            "times and machine load (other jobs shared this 2-core machine)"]


def markdown(meta: dict, rows: list[dict], skipped: list[dict], targets: list[dict]) -> str:
    methods = _ordered(r["method"] for r in rows)
    ratios = sorted({r["ratio"] for r in rows})
    lines = _header(meta) + ["", "## Targets", ""]
    lines += [f"- **{'PASS' if t['passed'] else 'FAIL'}** {t['name']}: {t['detail']}" for t in targets]
    for source in _ordered(r["queries"] for r in rows):
        for key, title in (("output_rel_err", "held-out output rel. error (mean over heads)"),
                           ("output_rel_err_median", "held-out output rel. error (median over heads)"),
                           ("mass_rel_err", "held-out mass rel. error (mean over heads)"),
                           ("compact_seconds", "compaction seconds (all heads)")):
            lines += ["", f"### queries = {source}: {title}", ""]
            lines += _table(rows, source, key, methods, ratios)
    if skipped:
        lines += ["", "## Runs not made", ""]
        lines += [f"- {s['method']} at {s['ratio']:g}x, queries={s['queries']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def write_plot(path: Path, rows: list[dict]) -> None:
    """Held-out output error vs ratio, one panel per query source, one line per method (log y; `none` omitted)."""
    sources = _ordered(r["queries"] for r in rows)
    methods = [m for m in _ordered(r["method"] for r in rows) if m != "none"]
    figure, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 4), sharey=True, squeeze=False)
    colors = {method: f"C{index}" for index, method in enumerate(methods)}  # same colour in every panel
    ratios = sorted({r["ratio"] for r in rows if r["method"] != "none"})
    for axis, source in zip(axes[0], sources):
        for method in methods:
            points = sorted((r["ratio"], r["output_rel_err"]) for r in rows
                            if r["queries"] == source and r["method"] == method and r["output_rel_err"] > 0)
            if points:
                axis.plot(*zip(*points), marker="o", label=method, color=colors[method])
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xticks(ratios, [f"{ratio:g}x" for ratio in ratios])
        axis.minorticks_off()
        axis.set_title(f"queries = {source}")
        axis.set_xlabel("compaction ratio")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("held-out output rel. error")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", label=m) for m in methods]
    figure.tight_layout(rect=(0, 0, 0.9, 1))  # room on the right for the legend
    figure.legend(handles=handles, loc="center right", fontsize=8)
    figure.savefig(path, dpi=120)
    plt.close(figure)
