"""`vllm-compact bench needle-sources`: which reference queries let query-agnostic compaction keep a needle.

The engine's needle benchmark fits compaction on the recent window's queries (`after`). The issue asks for
repeat-prefill queries if those are not enough. This benchmark answers that before an extra forward per
compaction is built into the engine, with an offline replica of what the engine does to a needle prompt:
- the document (the prompt without its question) is prefilled with full attention (transformers, fp32);
- everything except the protected first tokens and the recent window is compacted in one batched call, with the
  chosen method and reference queries:
  `after`  = the queries of the recent window (what the engine keeps in its reservoir),
  `repeat` = repeat-prefill: "Repeat the previous context verbatim." and the span teacher-forced on top of the
             full cache (attention-matching.md section 3; one extra prefill of the span),
  `after+repeat` = both;
- the question is forwarded over [protected tokens ; compact entries with beta ; recent window] by a plain-torch
  Llama forward at the original positions, and greedy decoding must reproduce the needle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

SOURCES = ("after", "repeat", "after+repeat")
METHODS = ("am-highest-attention", "am-omp", "snapkv", "h2o", "recent")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-compact bench needle-sources", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or path (Llama-style)")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096], help="prompt lengths in tokens")
    p.add_argument("--depths", type=int, default=5, help="needle depths per context, evenly spaced in [0, 1]")
    p.add_argument("--methods", nargs="+", default=["am-highest-attention", "snapkv"], choices=METHODS)
    p.add_argument("--ratios", type=float, nargs="+", default=[5, 10])
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    p.add_argument("--recent", type=int, default=256, help="protected recent window (its queries are `after`)")
    p.add_argument("--protected", type=int, default=4, help="protected initial tokens")
    p.add_argument("--max-queries", type=int, default=4096,
                   help="reference queries per KV head and source (evenly strided), as the engine's cap")
    p.add_argument("--answer-tokens", type=int, default=10, help="greedy tokens decoded after the question")
    p.add_argument("--out", default="bench/results/needle_sources.json")
    return p


class _Replica:
    """One needle prompt: its captured span, the recent window's cache, and decoding over a compacted cache."""

    def __init__(self, model, reference, tokenizer, prompt_ids, question_tokens: int, args) -> None:
        import torch

        from vllm_compact.benchmarks.capture import REPEAT_INSTRUCTION, TokenLayout, capture, config_rotary
        from vllm_compact.benchmarks.reference_llama import LayerCache

        self.reference, self.tokenizer, self.args = reference, tokenizer, args
        document, self.question = prompt_ids[:-question_tokens], prompt_ids[-question_tokens:]
        span, recent = document[: -args.recent], document[-args.recent :]
        instruction = tokenizer(REPEAT_INSTRUCTION, add_special_tokens=False)["input_ids"]
        layout = TokenLayout(span=torch.tensor(span), after=torch.tensor(recent), heldout=torch.tensor(self.question),
                             repeat=torch.tensor(instruction + span), instruction_tokens=len(instruction))
        layers = list(range(model.config.num_hidden_layers))
        self.captured = capture(model, layout, layers)
        keys, values = self.captured.keys, self.captured.values  # [L, Hkv, T, D]
        self.full = [LayerCache(keys[i], values[i], torch.zeros(keys.shape[1], keys.shape[2])) for i in layers]
        # The recent window's K/V as the engine has them: computed over the full, not yet compacted, span.
        reference.forward(recent, list(range(len(span), len(document))), self.full)
        self.recent = [cache.slice(len(span), len(document)) for cache in self.full]
        self.document_len = len(document)
        self.rotary = config_rotary(model.config, len(prompt_ids))

    def compacted_cache(self, method: str, ratio: float, source: str, options: dict | None = None,
                        forced_keys=None):
        """[protected ; compact entries ; recent window] per layer. `options` configure the method; `forced_keys`
        (span positions, protected head included) are added to every head with their original K/V and beta 0."""
        import torch

        from vllm_compact.am import HeadBatch, compact_heads, uniform_budgets
        from vllm_compact.benchmarks.am import reference_queries
        from vllm_compact.benchmarks.reference_llama import LayerCache, compact_layer_cache

        cap, protected = self.captured, self.args.protected
        queries = torch.cat([reference_queries(cap, name, self.args.max_queries)[0] for name in source.split("+")], 1)
        keys, values = cap.keys[:, :, protected:].flatten(0, 1), cap.values[:, :, protected:].flatten(0, 1)
        num_layers, num_kv_heads = cap.keys.shape[:2]
        key_len = torch.full((keys.shape[0],), keys.shape[1])
        positions = torch.arange(protected, protected + keys.shape[1]).expand(keys.shape[0], -1)
        batch = HeadBatch(keys=keys, values=values, queries=queries, scale=cap.scale,
                          budget=uniform_budgets(key_len, ratio), key_len=key_len,
                          content_keys=self.rotary.unrotate(keys, positions).to(keys.dtype))
        compacted = compact_heads(batch, method, **(options or {}))
        forced = torch.tensor([p - protected for p in (forced_keys or ()) if p >= protected], dtype=torch.long)
        caches = []
        for layer in range(num_layers):
            entries = []
            for h in range(num_kv_heads):
                row = layer * num_kv_heads + h
                indices, k, beta, v = compacted.head(row)
                extra = forced[~torch.isin(forced, indices)]
                if extra.numel():
                    k, v = torch.cat([k, keys[row, extra]]), torch.cat([v, values[row, extra]])
                    beta = torch.cat([beta, torch.zeros(extra.numel(), dtype=beta.dtype)])
                entries.append((k, v, beta))
            head = LayerCache(cap.keys[layer, :, :protected], cap.values[layer, :, :protected],
                              torch.zeros(num_kv_heads, protected))
            caches.append(LayerCache.cat([head, compact_layer_cache(entries), self.recent[layer]]))
        return caches

    def question_logits(self, cache):
        """Logits of the question tokens over `cache` at their original positions, and the grown cache."""
        cache = list(cache)  # forward appends per layer: keep the caller's list intact
        positions = list(range(self.document_len, self.document_len + len(self.question)))
        return self.reference.forward(self.question, positions, cache), cache

    def answer(self, cache) -> str:
        logits, cache = self.question_logits(cache)
        position = self.document_len + len(self.question)
        tokens = []
        for _ in range(self.args.answer_tokens):
            tokens.append(int(logits[-1].argmax()))
            logits = self.reference.forward(tokens[-1:], [position], cache)
            position += 1
        return self.tokenizer.decode(tokens)


def _configs(args) -> list[tuple[str, float, str]]:
    configs = [("none", 1.0, "-")]
    for method in args.methods:
        sources = ["-"] if method == "recent" else args.sources
        configs += [(method, ratio, source) for ratio in args.ratios for source in sources]
    return configs


def run(args) -> tuple[list[dict], list[dict]]:
    import torch
    from tqdm import tqdm

    from vllm_compact.benchmarks.capture import load_model
    from vllm_compact.benchmarks.reference_llama import ReferenceLlama
    from vllm_compact.data.needle import make_needle_prompt, needle_depths
    from vllm_compact.server.serve import resolve_model

    model, tokenizer = load_model(Path(resolve_model(args.model)))
    reference = ReferenceLlama(model)
    configs = _configs(args)
    depths = needle_depths(args.depths)
    counts: dict[tuple, list[int]] = {}
    answers = []
    prompts = [(ctx, i, depth) for ctx in args.contexts for i, depth in enumerate(depths)]
    for ctx, i, depth in tqdm(prompts, desc="needle prompts", file=sys.stderr):
        needle = make_needle_prompt(tokenizer, ctx, depth, "number", seed=i)  # the engine benchmark's prompts
        ids = tokenizer.encode(needle.prompt, add_special_tokens=False)
        question_tokens = len(tokenizer.encode(f"\n{needle.question} {needle.answer_prefix}",
                                               add_special_tokens=False))
        replica = _Replica(model, reference, tokenizer, ids, question_tokens, args)
        for method, ratio, source in configs:
            with torch.no_grad():
                cache = replica.full if method == "none" else replica.compacted_cache(
                    method, ratio, "after" if source == "-" else source)
                text = replica.answer(cache)
            hit = needle.is_answered_by(text)
            tally = counts.setdefault((method, ratio, source, ctx), [0, 0])
            tally[0] += int(hit)
            tally[1] += 1
            answers.append({"method": method, "ratio": ratio, "queries": source, "context_tokens": ctx,
                            "depth": needle.depth, "answer": needle.answer, "completion": text, "hit": hit})
    rows = [{"method": m, "ratio": r, "queries": s, "context_tokens": c, "needle_accuracy": h / n, "hits": h,
             "prompts": n} for (m, r, s, c), (h, n) in counts.items()]
    return rows, answers


def _markdown(rows: list[dict], args, elapsed: float) -> str:
    lines = [
        "# Needle retention by reference-query source (offline replica of the engine's compaction)",
        "",
        f"Command: `vllm-compact bench needle-sources --contexts {' '.join(map(str, args.contexts))} --ratios "
        f"{' '.join(f'{r:g}' for r in args.ratios)} --methods {' '.join(args.methods)} --sources "
        f"{' '.join(args.sources)}`; model {args.model}; "
        f"recent window {args.recent}, protected {args.protected}, at most {args.max_queries} queries per KV head "
        f"and source; {platform.machine()} CPU x{os.cpu_count()}; {elapsed / 60:.1f} min.",
        "",
        "The needle prompts of `bench needle`; the span before the recent window is compacted before the question "
        "is seen. Hits / prompts per context length.",
        "",
        "| method | ratio | queries | " + " | ".join(f"{c}" for c in args.contexts) + " | all |",
        "|---|---|---|" + "---|" * len(args.contexts) + "---|",
    ]
    grouped: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        grouped.setdefault((r["method"], r["ratio"], r["queries"]), {})[r["context_tokens"]] = r
    for (method, ratio, source), per_ctx in grouped.items():
        cells = [f"{per_ctx[c]['hits']}/{per_ctx[c]['prompts']}" if c in per_ctx else "-" for c in args.contexts]
        hits = sum(r["hits"] for r in per_ctx.values())
        total = sum(r["prompts"] for r in per_ctx.values())
        lines.append(f"| {method} | {ratio:g} | {source} | " + " | ".join(cells) + f" | {hits}/{total} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    rows, answers = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "answers": answers}, indent=1))
    out.with_suffix(".md").write_text(_markdown(rows, args, time.perf_counter() - started))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
