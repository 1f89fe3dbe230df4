"""Capture: one forward per context, the per-head statistics computed inside the attention call."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from vllm_compact.calibration.objectives import coverage_curve, head_errors, keys_needed


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

    def __init__(self, layout: Layout, keep: bool = False, rotary=None) -> None:
        self.layout = layout  # of the context being run (a facts context sets its own window)
        self.keep = keep  # also keep the layer's span keys/values and pooled queries (for the error objective)
        self.rotary = rotary  # the model's RoPE: kept keys also come unrotated (the engine's content keys)
        self.sums: dict[int, object] = {}
        self.kept: dict[int, tuple] = {}
        self.scale: float | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        import torch
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
            kept = [span_keys, span_values, reference, heldout]
            if self.rotary is not None:
                positions = torch.arange(lay.protected, lay.span).expand(num_kv, -1)
                kept.append(self.rotary.unrotate(span_keys.float(), positions))
            self.kept[layer] = tuple(t.float().contiguous() for t in kept)
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


def context_inputs(tokenizer, text: str, offset: int, layout: Layout, facts: int, seed: int) -> tuple[list[int], Layout]:
    """One context's token ids and its layout: essay text, or (facts > 0) essay text with facts planted in the
    span and their questions and answers as the held-out window (calibration.facts)."""
    if facts <= 0:
        return context_ids(tokenizer, text, offset, layout.tokens), layout
    from dataclasses import replace

    from vllm_compact.calibration.facts import fact_context

    essay = context_ids(tokenizer, text, offset, layout.span + layout.recent)
    context = fact_context(tokenizer, essay, layout.protected, layout.span, layout.recent, facts, seed)
    return context.ids, replace(layout, window=context.window)


def measure(model, tokenizer, text: str, layout: Layout, contexts: int, share: float, progress: bool = True,
            objective: str = "coverage", grid: list[float] = (), method: str = "am-highest-attention",
            method_options: dict | None = None, facts: int = 0):
    """Averaged over the contexts: ([L, H] int64 keys_needed, [L, H, T] float64 coverage curves,
    [L, H, B] float64 held-out output errors at grid_budgets(T, grid) (None unless objective 'output-error'),
    seconds). `facts` > 0: the held-out window is the questions and answers of facts planted in the span."""
    import torch
    from tqdm import tqdm
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vllm_compact.benchmarks.capture import config_rotary

    with_errors = objective == "output-error"
    name = "vllm_compact_calibrate"
    # only the span's keys are unrotated: positions below layout.span
    recorder = _CoverageRecorder(layout, keep=with_errors, rotary=config_rotary(model.config, layout.span))
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
        for seed, offset in enumerate(context_offsets(text, contexts)):
            context, recorder.layout = context_inputs(tokenizer, text, offset, layout, facts, seed)
            ids = torch.tensor([context])
            model.set_attn_implementation(name)
            try:
                with torch.no_grad():
                    model(input_ids=ids, position_ids=torch.arange(len(context))[None], use_cache=False)
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
