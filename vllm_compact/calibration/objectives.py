"""The two per-head objectives of calibration: held-out attention coverage and held-out AM output error."""

from __future__ import annotations

OBJECTIVES = {"output-error": "output-error-exchange", "coverage": "coverage-greedy"}  # -> the table's "method"


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


def head_errors(kept: dict, scale: float, budgets: list[int], method: str, options: dict, bar=None):
    """[L, H, B] held-out attention-output relative error of `method` per head, every head at each budget."""
    import torch

    from vllm_compact.am import HeadBatch, compact_heads
    from vllm_compact.benchmarks.heldout import heldout_errors, heldout_reference

    layers = sorted(kept)
    keys, values, reference, heldout, *content = (torch.cat([kept[layer][i] for layer in layers])
                                                  for i in range(len(kept[layers[0]])))
    num_layers, heads = len(layers), keys.shape[0] // len(layers)
    truth = heldout_reference(keys, values, heldout, scale)
    out = torch.zeros(num_layers, heads, len(budgets), dtype=torch.float64)
    for b, budget in enumerate(budgets):
        batch = HeadBatch(keys=keys, values=values, queries=reference, scale=scale,
                          budget=torch.full((keys.shape[0],), budget, dtype=torch.long),
                          content_keys=content[0] if content else None)
        compacted = compact_heads(batch, method, **options)
        out[:, :, b] = heldout_errors(truth, compacted)["output_rel_err"].double().view(num_layers, heads)
        if bar is not None:
            bar.update(1)
    return out
