"""`vllm-compact calibrate MODEL`: a per-(layer, KV head) budget table measured on real text.

The method: the paper's sensitivity calibration and greedy exchange, with a held-out objective
------------------------------------------------------------------------------------------------
The paper (design note section 5) holds every head at a uniform ratio, sweeps each head's budget, records the
change in log-perplexity of reference answers, and then moves budget greedily from the cheapest donor to the
most-benefiting recipient, averaged over target ratios. Here, per (layer, KV head) and per context of essay text
(vllm_compact/data/essays.py, spread evenly over the first nine tenths of the corpus; `vllm-compact bench
head-budgets` evaluates on the last tenth), with the token layout the engine compacts (`--protected` head | span |
`--recent` window | `--window` held-out tokens), keys and queries post-RoPE as the model computes them
(transformers, fp32, one forward per context):

1. sensitivity: the engine's method (`--method`, default am-highest-attention with the engine's default options)
   compacts EVERY head of the span at each ratio of `--grid` (2.5 .. 40x), fitted on the recent window's queries
   (the engine's reservoir; GQA group pooled); the head's error at that budget is the attention-output relative
   error ||O_compact - O|| / ||O|| of the held-out queries (tokens after the recent window, never seen by the
   fit: like the queries that read the compacted span later) against the span's original attention. All heads of
   a grid point are solved in one batched call, as in the engine, so the sweep costs len(grid) solves per context
   instead of one perplexity evaluation per head and budget;
2. exchange: for each target ratio in `--ratios` (default 5, 10, 20), start every head at the uniform budget and
   move budget/8 entries from the head whose error rises least to the head whose error falls most while the
   summed error falls (errors between grid points interpolated in log budget), no head below `--floor` x uniform
   (default 0.25: a head that is cheap on essays may be the one that reads a fact later) nor above 0.75 of the
   span (the engine's cap);
3. the proportions are the allocations' average over the target ratios (one table for every ratio).

Why this objective: what compaction must preserve is each head's attention output on FUTURE queries; the
relative output error on held-out queries is what `bench am` reports and what the AM fit targets, measured for
the method the engine runs, on the queries the engine has. Perplexity of reference answers (the paper) is the
end-to-end version, but it needs a forward per head and budget. `--objective coverage` is a cheaper proxy (no
AM solves): the held-out attention mass on the keys ranked by the reference queries' RMS attention
(coverage_curve), maximised by a greedy; on SmolLM2-135M it did not beat uniform budgets held out (see the
README), so it is not the default. `keys_needed` (keys for `--share` of a head's held-out mass) is recorded as a
readable diagnostic of how diffuse each head is.

Where budget moves: `--scope layer` (default, shipped) redistributes only among the KV heads of a layer: every
layer's row sums to 1 / num_layers, so every layer keeps exactly the uniform total. This is a memory decision:
HeadBudgetPolicy packs a layer's heads back to back and the FULLEST layer decides the page count for every layer
(pages are allocated for all layers at once), so moving budget from one layer to another costs pages the
receiving layer's peers leave empty. With a layer-scoped table the engine distributes per layer, and the pages
and physical tokens equal uniform's exactly. `--scope model` lets budget move across layers too; the command
prints what that costs in pages at the same nominal ratio. The memory report uses the engine's HeadBudgetPolicy.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OBJECTIVES = {"output-error": "output-error-exchange", "coverage": "coverage-greedy"}  # -> the table's "method"
FORMAT_VERSION = 1


# ---- the statistic (pure torch, tested against a float64 recomputation) --------------------------------------------


def coverage_curve(reference, heldout, keys, scale: float):
    """[H, T] float64: coverage[h, k-1] = mean over held-out queries of the local attention mass (softmax over the
    T span keys) on the k keys with the highest RMS local attention over the reference queries.

    reference [H, n_ref, D], heldout [H, n_ho, D], keys [H, T, D] (queries pooled per KV head, post-RoPE).
    """
    import torch

    k = keys.double()
    ref = torch.softmax(scale * (reference.double() @ k.transpose(1, 2)), dim=-1)  # [H, n_ref, T]
    score = ref.square().mean(1).sqrt()  # [H, T]
    order = score.argsort(dim=-1, descending=True, stable=True)
    del ref
    held = torch.softmax(scale * (heldout.double() @ k.transpose(1, 2)), dim=-1)  # [H, n_ho, T]
    ranked = held.gather(-1, order.unsqueeze(1).expand_as(held))
    return ranked.cumsum(-1).mean(1)


def keys_needed(curve, share: float):
    """[H] int64: the smallest k with curve[h, k-1] >= share (T where float rounding keeps it just below)."""
    import torch

    reached = curve >= share
    first = reached.int().argmax(-1) + 1
    return torch.where(reached.any(-1), first, torch.full_like(first, curve.shape[-1]))


def greedy_allocation(curves, total: int, floor_units: int, cap: int) -> list[int]:
    """Entries per head for `total` entries over the heads of `curves` ([G, T] coverage, curves[g, k-1] = coverage
    with k keys): every head starts at floor_units, each further entry goes to the head whose coverage gains the
    most from it (ties: the lower head index), no head above `cap`. Optimal for concave curves."""
    import heapq

    rows = [[0.0, *map(float, row)] for row in curves.double().tolist()]  # rows[g][k] = coverage with k keys
    heads = len(rows)
    cap = max(1, min(cap, len(rows[0]) - 1))
    start = min(max(1, floor_units), cap)
    alloc = [start] * heads
    left = total - start * heads
    heap = [(-(row[start + 1] - row[start]), g) for g, row in enumerate(rows) if start < cap]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, g = heapq.heappop(heap)
        alloc[g] += 1
        left -= 1
        k = alloc[g]
        if k < cap:
            heapq.heappush(heap, (-(rows[g][k + 1] - rows[g][k]), g))
    return alloc


def _averaged_shares(rows, span: int, ratios: list[float], floor: float, scope: str, allocate):
    """[L, H] float64 proportions summing to 1: `allocate(head_rows, per_head, floor_units, cap)` (integer entries
    per head of `head_rows` [n, ...], n heads sharing n x per_head) at each ratio, per layer for scope 'layer' or
    over all heads for 'model', as a share of its total, averaged over ratios. Scope 'layer' gives every row 1 / L."""
    import torch

    num_layers, num_heads = rows.shape[:2]
    cap = max(1, math.floor(0.75 * span))
    out = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    for ratio in ratios:
        per_head = max(1, round(span / ratio))
        floor_units = max(1, math.floor(floor * per_head))
        if scope == "layer":
            for layer in range(num_layers):
                alloc = torch.tensor(allocate(rows[layer], per_head, floor_units, cap), dtype=torch.float64)
                out[layer] += alloc / alloc.sum() / num_layers
        elif scope == "model":
            alloc = torch.tensor(allocate(rows.flatten(0, 1), per_head, floor_units, cap), dtype=torch.float64)
            out += (alloc / alloc.sum()).view(num_layers, num_heads)
        else:
            raise ValueError(f"scope must be 'layer' or 'model', got {scope!r}")
    return out / len(ratios)


def proportions_from_curves(curves, ratios: list[float], floor: float, scope: str):
    """[L, H] proportions from [L, H, T] coverage curves: the greedy allocation at each ratio."""
    def allocate(heads, per_head, floor_units, cap):
        return greedy_allocation(heads, per_head * heads.shape[0], floor_units, cap)

    return _averaged_shares(curves, curves.shape[2], ratios, floor, scope, allocate)


# ---- capture: one forward per context, the statistic computed inside the attention call ------------------------------


@dataclass(frozen=True)
class Layout:
    protected: int
    span: int
    recent: int
    window: int

    @property
    def tokens(self) -> int:
        return self.span + self.recent + self.window


class _CoverageRecorder:
    """Transformers attention function: adds each layer's coverage curve to a running sum, then delegates."""

    def __init__(self, layout: Layout, keep: bool = False) -> None:
        self.layout = layout
        self.keep = keep  # also keep the layer's span keys/values and pooled queries (for the error objective)
        self.sums: dict[int, object] = {}
        self.kept: dict[int, tuple] = {}
        self.scale: float | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        lay = self.layout
        scale = float(scaling if scaling is not None else module.scaling)
        self.scale = scale
        num_kv = key.shape[1]
        q = query[0].detach()  # [Hq, N, D]
        hq, _, d = q.shape
        group = hq // num_kv

        def pooled(lo: int, hi: int):  # query head j belongs to KV head j // G (transformers' repeat_kv order)
            return q[:, lo:hi].reshape(num_kv, group * (hi - lo), d)

        reference, heldout = pooled(lay.span, lay.span + lay.recent), pooled(lay.span + lay.recent, lay.tokens)
        span_keys = key[0, :, lay.protected : lay.span].detach()
        curve = coverage_curve(reference, heldout, span_keys, scale)
        layer = int(module.layer_idx)
        if self.keep:
            span_values = value[0, :, lay.protected : lay.span].detach()
            self.kept[layer] = tuple(t.float().contiguous() for t in (span_keys, span_values, reference, heldout))
        self.sums[layer] = curve if layer not in self.sums else self.sums[layer] + curve
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def context_offsets(text: str, count: int) -> list[int]:
    """`count` sentence starts spread evenly over the text (the last context must still fit)."""
    from bisect import bisect_left

    from vllm_compact.data.essays import sentence_starts

    starts = sentence_starts(text)
    usable = max(1, int(len(text) * 0.9))
    offsets = []
    for i in range(count):
        target = usable * i // count
        offsets.append(starts[min(bisect_left(starts, target), len(starts) - 1)])
    return offsets


def context_ids(tokenizer, text: str, offset: int, tokens: int) -> list[int]:
    chars = tokens * 6
    while True:
        ids = tokenizer(text[offset : offset + chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens or offset + chars >= len(text):
            break
        chars *= 2
    if len(ids) < tokens:
        raise ValueError(f"the text from offset {offset} has {len(ids)} tokens; a context needs {tokens}")
    return ids[:tokens]


def grid_budgets(span: int, grid: list[float]) -> list[int]:
    """Ascending distinct budgets round(span / g) of the error grid's ratios."""
    return sorted({max(1, min(span, round(span / g))) for g in grid})


def measure(model, tokenizer, text: str, layout: Layout, contexts: int, share: float, progress: bool = True,
            objective: str = "coverage", grid: list[float] = (), method: str = "am-highest-attention",
            method_options: dict | None = None):
    """Averaged over the contexts: ([L, H] int64 keys_needed, [L, H, T] float64 coverage curves,
    [L, H, B] float64 held-out output errors at grid_budgets(T, grid) (None unless objective 'output-error'),
    seconds)."""
    import torch
    from tqdm import tqdm
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with_errors = objective == "output-error"
    name = "vllm_compact_calibrate"
    recorder = _CoverageRecorder(layout, keep=with_errors)
    ALL_ATTENTION_FUNCTIONS.register(name, recorder)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    span = layout.span - layout.protected
    budgets = grid_budgets(span, list(grid)) if with_errors else []
    errors = None
    started = time.perf_counter()
    steps = contexts * (1 + len(budgets))
    bar = tqdm(total=steps, desc="calibrate", unit="step", file=sys.stderr, disable=not progress)
    try:
        for offset in context_offsets(text, contexts):
            ids = torch.tensor([context_ids(tokenizer, text, offset, layout.tokens)])
            model.set_attn_implementation(name)
            try:
                with torch.no_grad():
                    model(input_ids=ids, position_ids=torch.arange(layout.tokens)[None], use_cache=False)
            finally:
                model.set_attn_implementation(previous)
            bar.update(1)
            if with_errors:
                found = head_errors(recorder.kept, recorder.scale, budgets, method, method_options or {}, bar)
                errors = found if errors is None else errors + found
                recorder.kept.clear()
    finally:
        bar.close()
    layers = sorted(recorder.sums)
    curves = torch.stack([recorder.sums[layer] / contexts for layer in layers])  # [L, H, T]
    counts = torch.stack([keys_needed(curves[i], share) for i in range(len(layers))])
    return counts, curves, (errors / contexts if errors is not None else None), time.perf_counter() - started


def head_errors(kept: dict, scale: float, budgets: list[int], method: str, options: dict, bar=None):
    """[L, H, B] held-out attention-output relative error of `method` per head, every head at each budget."""
    import torch

    from vllm_compact.am import HeadBatch, compact_heads
    from vllm_compact.benchmarks.heldout import heldout_errors, heldout_reference

    layers = sorted(kept)
    keys, values, reference, heldout = (torch.cat([kept[layer][i] for layer in layers]) for i in range(4))
    num_layers, heads = len(layers), keys.shape[0] // len(layers)
    truth = heldout_reference(keys, values, heldout, scale)
    out = torch.zeros(num_layers, heads, len(budgets), dtype=torch.float64)
    for b, budget in enumerate(budgets):
        batch = HeadBatch(keys=keys, values=values, queries=reference, scale=scale,
                          budget=torch.full((keys.shape[0],), budget, dtype=torch.long))
        compacted = compact_heads(batch, method, **options)
        out[:, :, b] = heldout_errors(truth, compacted)["output_rel_err"].double().view(num_layers, heads)
        if bar is not None:
            bar.update(1)
    return out


def interpolated_error(errors_h: list[float], budgets: list[int], b: float) -> float:
    """A head's error at budget b: linear in log(budget) between the grid points, the first segment's slope
    below the grid (fewer keys keep costing), flat above it (no gain claimed where nothing was measured)."""
    if len(budgets) == 1:
        return errors_h[0]
    x = math.log(max(b, 1e-9))
    xs = [math.log(v) for v in budgets]
    if x >= xs[-1]:
        return errors_h[-1]
    i = 0 if x <= xs[0] else max(j for j in range(len(xs) - 1) if xs[j] <= x)
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return errors_h[i] + t * (errors_h[i + 1] - errors_h[i])


def exchange_allocation(errors, budgets: list[int], uniform: int, floor_units: int, cap: int,
                        step: int | None = None, max_moves: int = 100_000) -> list[int]:
    """The paper's greedy exchange on [G, B] error curves at grid `budgets`: start every head at `uniform`, move
    `step` entries (default uniform / 8) from the donor that loses least to the recipient that gains most while
    that lowers the summed error; no head below floor_units or above cap. The total stays G x uniform."""
    rows = errors.double().tolist()
    heads = len(rows)
    step = step or max(1, uniform // 8)
    alloc = [uniform] * heads

    def err(h: int, b: int) -> float:
        return interpolated_error(rows[h], budgets, b)

    for _ in range(max_moves):
        gains = [(err(h, alloc[h]) - err(h, alloc[h] + step), h) for h in range(heads) if alloc[h] + step <= cap]
        costs = [(err(h, alloc[h] - step) - err(h, alloc[h]), h) for h in range(heads)
                 if alloc[h] - step >= floor_units]
        best = None
        for gain, r in gains:
            for cost, d in costs:
                if d != r and gain - cost > 1e-12 and (best is None or gain - cost > best[0]):
                    best = (gain - cost, r, d)
        if best is None:
            break
        _, r, d = best
        alloc[r] += step
        alloc[d] -= step
    return alloc


def proportions_from_errors(errors, budgets: list[int], span: int, ratios: list[float], floor: float, scope: str):
    """[L, H] proportions from [L, H, B] error curves: the exchange from uniform at each ratio."""
    def allocate(heads, per_head, floor_units, cap):
        return exchange_allocation(heads, budgets, per_head, floor_units, cap)

    return _averaged_shares(errors, span, ratios, floor, scope, allocate)


# ---- memory accounting with the engine's own policy -------------------------------------------------------------------


def memory_report(table: list[list[float]] | None, span: int, ratio: float, block_size: int) -> dict:
    """Per-layer entry totals, pages (the fullest layer decides) and physical tokens of one compacted span."""
    import tempfile

    from vllm_compact.core.budgets import HeadBudgetPolicy

    num_layers, num_heads = (len(table), len(table[0])) if table else (None, None)
    path = None
    if table is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"proportions": table}, f)
            path = f.name
    try:
        policy = HeadBudgetPolicy(num_layers, num_heads, ratio, table_path=path)
    finally:
        if path:
            Path(path).unlink()
    budgets = policy.budgets(span, span, None)
    pages = policy.pages_needed(budgets, block_size)
    totals = [sum(row) for row in budgets]
    return {
        "span_tokens": span,
        "ratio": ratio,
        "block_size": block_size,
        "layer_totals": totals,
        "entries": sum(totals),
        "pages": pages,
        "physical_tokens": pages * block_size,  # per layer and KV head lane, like an uncompacted page's tokens
        "effective_ratio": span / (pages * block_size),
        "min_head": min(min(row) for row in budgets),
        "max_head": max(max(row) for row in budgets),
    }


def mean_coverage(curves, table: list[list[float]] | None, ratio: float) -> float:
    """Mean over heads of coverage at the budgets the engine's HeadBudgetPolicy gives a span of T keys."""
    import tempfile

    from vllm_compact.core.budgets import HeadBudgetPolicy

    num_layers, num_heads, span = curves.shape
    path = None
    if table is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"proportions": table}, f)
            path = f.name
    try:
        budgets = HeadBudgetPolicy(num_layers, num_heads, ratio, table_path=path).budgets(span, span, None)
    finally:
        if path:
            Path(path).unlink()
    values = [float(curves[l, h, b - 1]) for l, row in enumerate(budgets) for h, b in enumerate(row)]
    return sum(values) / len(values)


def _policy_budgets(num_layers: int, num_heads: int, span: int, table: list[list[float]] | None, ratio: float):
    import tempfile

    from vllm_compact.core.budgets import HeadBudgetPolicy

    path = None
    if table is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"proportions": table}, f)
            path = f.name
    try:
        return HeadBudgetPolicy(num_layers, num_heads, ratio, table_path=path).budgets(span, span, None)
    finally:
        if path:
            Path(path).unlink()


def mean_error(errors, grid: list[int], span: int, table: list[list[float]] | None, ratio: float) -> float:
    """Mean over heads of the interpolated held-out output error at the engine's budgets (uniform or table)."""
    num_layers, num_heads, _ = errors.shape
    budgets = _policy_budgets(num_layers, num_heads, span, table, ratio)
    rows = errors.double().tolist()
    values = [interpolated_error(rows[l][h], grid, b) for l, row in enumerate(budgets) for h, b in enumerate(row)]
    return sum(values) / len(values)


def compare_memory(table: list[list[float]], span: int, ratio: float, block_size: int) -> dict:
    uniform = [[1.0] * len(table[0]) for _ in table]
    return {"uniform": memory_report(uniform, span, ratio, block_size),
            "calibrated": memory_report(table, span, ratio, block_size)}


# ---- the command --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


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
    summary = __doc__.split("\n\n", 1)[0]
    p = argparse.ArgumentParser(
        prog="vllm-compact calibrate",
        description=summary + "\n\n" + __doc__.split("\n\n", 1)[1]
        + "\nThe output is the head-budget file format ({\"proportions\": [[p per KV head] per layer]}, plus the "
        "measurements), usable with `vllm-compact serve ... --kv-compaction-head-budgets FILE`. Tables for "
        "smollm2-135m and qwen2.5-0.5b ship with the package and are used by default for those models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="a name of `vllm-compact models list` (fetched on first use) or a Hugging Face "
                                 "model folder")
    p.add_argument("--out", "-o", default=None,
                   help="output JSON file (default: ./<model>-head-budgets.json; '-' for stdout)")
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
    from vllm_compact.am.methods import method_class
    from vllm_compact.config import CompactionConfig

    engine = CompactionConfig()  # the engine's defaults: the method and its value options
    options = ({"value_ridge": engine.value_ridge, "refit_values": engine.refit_values}
               if method_class(args.method).fits else {})
    model, tokenizer = load_model(model_dir)
    counts, curves, errors, seconds = measure(
        model, tokenizer, text, layout, args.contexts, args.share, progress=not args.no_progress,
        objective=args.objective, grid=args.grid, method=args.method, method_options=options)
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
            "window": args.window, "share": args.share, "floor": args.floor, "ratios": args.ratios,
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


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # bad arguments: argparse exits 2 with the reason
    if args.protected >= args.span:
        parser.error(f"--protected ({args.protected}) must be smaller than --span ({args.span})")
    from vllm_compact.am.methods import METHODS

    if args.method not in METHODS:
        parser.error(f"--method {args.method!r} is not one of {', '.join(METHODS)}")
    if args.text is not None and not Path(args.text).is_file():
        parser.error(f"--text {args.text!r} is not a file")
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
