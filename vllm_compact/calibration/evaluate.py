"""`vllm-compact calibrate MODEL --evaluate [TABLE]`: uniform against a head-budget table, on held-out text.

Contexts come from the LAST tenth of the essay corpus (a calibration's contexts start in the first nine tenths),
laid out as the engine compacts: [protected head | span | recent window | held-out tokens]. The method (with the
engine's default options) is fitted on the recent window's queries (the engine's reservoir) and scored on the
held-out tokens' queries against the span's original attention: attention-output relative error and mass error
per (layer, KV head), plus the share of the held-out local attention mass that lands on the kept keys. Budgets come
from the engine's own HeadBudgetPolicy (uniform, or the table), with the pages and physical tokens they take.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHIPPED = "shipped"  # --evaluate without a file: the table shipped for the model


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


def evaluate(args: argparse.Namespace, name: str, model_dir: Path) -> tuple[dict, str] | None:
    """(results document, markdown) of uniform budgets against `args.evaluate`; None when the model has no table."""
    import torch
    from tqdm import tqdm

    from vllm_compact.am import HeadBatch, compact_heads, uniform_budgets
    from vllm_compact.benchmarks.capture import build_layout, capture, load_model
    from vllm_compact.benchmarks.heldout import heldout_errors, heldout_reference
    from vllm_compact.config import CompactionConfig
    from vllm_compact.core.budgets import HeadBudgetPolicy
    from vllm_compact.data.essays import essay_text, sentence_starts
    from vllm_compact.head_table import read_model_config, resolve_head_budgets

    table, how = resolve_head_budgets(None if args.evaluate == SHIPPED else args.evaluate, name,
                                      read_model_config(model_dir))
    if table is None:
        return None
    options = CompactionConfig().method_options(args.method)  # the engine's defaults for the method
    model, tokenizer = load_model(model_dir)
    text = essay_text()
    starts = [s for s in sentence_starts(text) if s >= int(len(text) * 0.9)]
    offsets = [starts[len(starts) * i // (args.contexts + 1)] for i in range(args.contexts)]
    num_layers = model.config.num_hidden_layers
    per_context = []
    for offset in tqdm(offsets, desc="held-out contexts", disable=args.no_progress):
        layout = build_layout(tokenizer, text[offset:], args.span, args.recent, args.window, repeat=0)
        cap = capture(model, layout, list(range(num_layers)))
        keys = cap.keys[:, :, args.protected:].flatten(0, 1)
        values = cap.values[:, :, args.protected:].flatten(0, 1)
        heads_per_layer = cap.keys.shape[1]
        heads, span = keys.shape[0], keys.shape[1]
        reference = heldout_reference(keys, values, cap.queries["heldout"].flatten(0, 1), cap.scale)
        key_len = torch.full((heads,), span, dtype=torch.long)
        for ratio in args.ratios:
            policies = {"uniform": HeadBudgetPolicy(num_layers, heads_per_layer, ratio),
                        "table": HeadBudgetPolicy(num_layers, heads_per_layer, ratio, table_path=table)}
            for budgets_name, policy in policies.items():
                budgets = policy.budgets(span, span, None)
                budget = torch.tensor(budgets, dtype=torch.long).flatten()
                if budgets_name == "uniform":
                    assert torch.equal(budget, uniform_budgets(key_len, ratio).clamp(max=span))
                batch = HeadBatch(keys=keys, values=values, queries=cap.queries["after"].flatten(0, 1),
                                  scale=cap.scale, budget=budget, key_len=key_len)
                compacted = compact_heads(batch, args.method, **options)
                errors = heldout_errors(reference, compacted)
                per_context.append({
                    "offset": offset, "ratio": ratio, "head_budgets": budgets_name,
                    "output_rel_err": errors["output_rel_err"].tolist(),
                    "mass_rel_err": errors["mass_rel_err"].tolist(),
                    "kept_mass": _kept_mass(reference, compacted, keys, cap.scale).tolist(),
                    "pages": policy.pages_needed(budgets, args.block_size),
                    "layer_totals": [sum(r) for r in budgets],
                })
    rows = []
    for ratio in args.ratios:
        for budgets_name in ("uniform", "table"):
            runs = [r for r in per_context if (r["ratio"], r["head_budgets"]) == (ratio, budgets_name)]
            out = torch.tensor([r["output_rel_err"] for r in runs]).mean(0)
            mass = torch.tensor([r["mass_rel_err"] for r in runs]).mean(0)
            kept = torch.tensor([r["kept_mass"] for r in runs]).mean(0)
            rows.append({
                "model": name, "method": args.method, "ratio": ratio, "head_budgets": budgets_name,
                "output_rel_err_mean": float(out.mean()), "output_rel_err_median": float(out.median()),
                "mass_rel_err_mean": float(mass.mean()), "kept_mass_mean": float(kept.mean()),
                "kept_mass_min": float(kept.min()),
                "pages": runs[0]["pages"], "physical_tokens": runs[0]["pages"] * args.block_size,
                "layer_totals_min": min(runs[0]["layer_totals"]), "layer_totals_max": max(runs[0]["layer_totals"]),
                "contexts": len(runs),
            })
    document = {"command": args.command, "table": table, "head_budgets": how, "method_options": options,
                "span_keys": args.span - args.protected, "block_size": args.block_size, "rows": rows}
    return document, markdown(document, args)


def markdown(document: dict, args: argparse.Namespace) -> str:
    lines = [f"`{document['command']}`", "",
             f"Table: {document['head_budgets']}. Span {document['span_keys']} keys, block {document['block_size']}; "
             "fitted on the recent window's queries, scored on the held-out tokens' queries.", "",
             "| method | ratio | budgets | output rel err (mean / median) | mass err | kept held-out mass (mean / min "
             "head) | pages | physical tokens | per-layer totals |", "|---|---:|---|---|---:|---|---:|---:|---|"]
    for r in document["rows"]:
        lines.append(f"| {r['method']} | {r['ratio']:g} | {r['head_budgets']} | {r['output_rel_err_mean']:.4f} / "
                     f"{r['output_rel_err_median']:.4f} | {r['mass_rel_err_mean']:.4f} | {r['kept_mass_mean']:.3f} / "
                     f"{r['kept_mass_min']:.3f} | {r['pages']} | {r['physical_tokens']} | "
                     f"{r['layer_totals_min']}..{r['layer_totals_max']} |")
    return "\n".join(lines)
