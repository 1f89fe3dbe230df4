"""`vllm-compact bench head-budgets`: uniform vs calibrated per-head budgets on real tensors, held out.

Contexts come from the LAST tenth of the essay corpus (the calibration's contexts start in the first nine tenths),
laid out as the engine compacts: [protected head | span | recent window | held-out tokens]. Each method (with the
engine's default options) is fitted on the recent window's queries (the engine's reservoir) and scored on the
held-out tokens' queries against the span's original attention: attention-output relative error and mass error
per (layer, KV head), plus the share of the held-out local attention mass that lands on the kept keys. Budgets come from the engine's own
HeadBudgetPolicy (uniform, or the table), with the pages and physical tokens they take.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-compact bench head-budgets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--table", default=None, help="head-budget file (default: the table shipped for the model)")
    p.add_argument("--contexts", type=int, default=2)
    p.add_argument("--span", type=int, default=2048, help="span tokens, the protected head included")
    p.add_argument("--protected", type=int, default=128)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--heldout", type=int, default=256)
    p.add_argument("--ratios", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    p.add_argument("--methods", nargs="+", default=["am-highest-attention", "snapkv"])
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--out", default="bench/results/head_budgets.json")
    return p


def _kept_mass(reference, compacted, keys, scale) -> "torch.Tensor":  # noqa: F821
    """[H] mean over held-out queries of the original local attention mass on the kept keys."""
    import torch

    logits = torch.bmm(reference.queries, keys.double().transpose(1, 2)) * scale
    probs = torch.softmax(logits, dim=-1)  # [H, N, T]
    kept = torch.zeros(keys.shape[0], keys.shape[1], dtype=torch.float64)
    idx = compacted.indices.clamp(min=0)
    valid = compacted.indices >= 0
    kept.scatter_(1, idx, valid.double())
    return (probs * kept[:, None, :]).sum(-1).mean(-1)


def engine_options(method: str) -> dict:
    """The options the engine's compactor passes a fitting method (its config defaults)."""
    from vllm_compact.config import CompactionConfig

    return CompactionConfig().method_options(method)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import torch
    from tqdm import tqdm

    from vllm_compact.am import HeadBatch, compact_heads, uniform_budgets
    from vllm_compact.benchmarks.capture import build_layout, capture, load_model
    from vllm_compact.benchmarks.heldout import heldout_errors, heldout_reference
    from vllm_compact.data.essays import essay_text, sentence_starts
    from vllm_compact.core.budgets import HeadBudgetPolicy
    from vllm_compact.head_table import resolve_head_budgets
    from vllm_compact.models.registry import ensure_model

    model_dir = ensure_model(args.model) if not Path(args.model).is_dir() else Path(args.model)
    table, how = resolve_head_budgets(args.table, args.model)
    if table is None:
        print(f"bench head-budgets: no table for {args.model} ({how})", file=sys.stderr)
        return 2
    model, tokenizer = load_model(model_dir)
    text = essay_text()
    starts = [s for s in sentence_starts(text) if s >= int(len(text) * 0.9)]
    offsets = [starts[len(starts) * i // (args.contexts + 1)] for i in range(args.contexts)]
    num_layers = model.config.num_hidden_layers
    layers = list(range(num_layers))
    rows: list[dict] = []
    per_context = []
    for offset in tqdm(offsets, desc="head-budgets contexts", file=sys.stderr):
        layout = build_layout(tokenizer, text[offset:], args.span, args.recent, args.heldout, repeat=0)
        cap = capture(model, layout, layers)
        keys = cap.keys[:, :, args.protected:].flatten(0, 1)
        values = cap.values[:, :, args.protected:].flatten(0, 1)
        heads_per_layer = cap.keys.shape[1]
        heads, span = keys.shape[0], keys.shape[1]
        reference = heldout_reference(keys, values, cap.queries["heldout"].flatten(0, 1), cap.scale)
        key_len = torch.full((heads,), span, dtype=torch.long)
        for ratio in args.ratios:
            policies = {"uniform": HeadBudgetPolicy(num_layers, heads_per_layer, ratio),
                        "calibrated": HeadBudgetPolicy(num_layers, heads_per_layer, ratio, table_path=table)}
            for budgets_name, policy in policies.items():
                budgets = policy.budgets(span, span, None)
                budget = torch.tensor(budgets, dtype=torch.long).flatten()
                if budgets_name == "uniform":
                    assert torch.equal(budget, uniform_budgets(key_len, ratio).clamp(max=span))
                batch = HeadBatch(keys=keys, values=values, queries=cap.queries["after"].flatten(0, 1),
                                  scale=cap.scale, budget=budget, key_len=key_len)
                for method in args.methods:
                    compacted = compact_heads(batch, method, **engine_options(method))
                    errors = heldout_errors(reference, compacted)
                    kept = _kept_mass(reference, compacted, keys, cap.scale)
                    per_context.append({
                        "offset": offset, "method": method, "ratio": ratio, "head_budgets": budgets_name,
                        "output_rel_err": errors["output_rel_err"].tolist(),
                        "mass_rel_err": errors["mass_rel_err"].tolist(), "kept_mass": kept.tolist(),
                        "pages": policy.pages_needed(budgets, args.block),
                        "layer_totals": [sum(r) for r in budgets],
                    })
    for method in args.methods:
        for ratio in args.ratios:
            for budgets_name in ("uniform", "calibrated"):
                runs = [r for r in per_context if (r["method"], r["ratio"], r["head_budgets"]) ==
                        (method, ratio, budgets_name)]
                out = torch.tensor([r["output_rel_err"] for r in runs]).mean(0)
                mass = torch.tensor([r["mass_rel_err"] for r in runs]).mean(0)
                kept = torch.tensor([r["kept_mass"] for r in runs]).mean(0)
                rows.append({
                    "model": args.model, "method": method, "ratio": ratio, "head_budgets": budgets_name,
                    "output_rel_err_mean": float(out.mean()), "output_rel_err_median": float(out.median()),
                    "mass_rel_err_mean": float(mass.mean()), "kept_mass_mean": float(kept.mean()),
                    "kept_mass_min": float(kept.min()),
                    "pages": runs[0]["pages"], "physical_tokens": runs[0]["pages"] * args.block,
                    "layer_totals_min": min(runs[0]["layer_totals"]), "layer_totals_max": max(runs[0]["layer_totals"]),
                    "contexts": len(runs),
                })
    command = "vllm-compact bench head-budgets " + " ".join(argv)
    result = {"command": command, "table": table, "head_budgets": how, "span_keys": args.span - args.protected,
              "block_size": args.block, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"`{command}`", "", f"Table: {how}. Span {args.span - args.protected} keys, block {args.block}; "
             "fitted on the recent window's queries, scored on the held-out tokens' queries.", "",
             "| method | ratio | budgets | output rel err (mean / median) | mass err | kept held-out mass (mean / min "
             "head) | pages | physical tokens | per-layer totals |", "|---|---:|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:g} | {r['head_budgets']} | {r['output_rel_err_mean']:.4f} / "
                     f"{r['output_rel_err_median']:.4f} | {r['mass_rel_err_mean']:.4f} | {r['kept_mass_mean']:.3f} / "
                     f"{r['kept_mass_min']:.3f} | {r['pages']} | {r['physical_tokens']} | "
                     f"{r['layer_totals_min']}..{r['layer_totals_max']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
