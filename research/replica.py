"""An offline replica of one engine compaction of a needle prompt, with the answer decoded over it.

The document (the prompt without its last `question_tokens`) is prefilled with full attention (transformers,
fp32, post-RoPE keys and queries captured); everything between the protected first tokens and the recent window is
compacted in one batched call with a chosen method and reference queries (`after`: the recent window's, as the
engine's reservoir; `context`: the span's own; `repeat`: repeat-prefill of the span; joined by `+`); the question
is then forwarded over [protected ; compact entries with beta ; recent window] at the original positions by the
plain-torch Llama forward of the engine tests (`tests/reference_llama.py`), and greedy decoding gives the answer.
Used by `research.needle_replica`.
"""

from __future__ import annotations


class Replica:
    """One needle prompt: its captured span, the recent window's cache, and decoding over a compacted cache."""

    def __init__(self, model, reference, tokenizer, prompt_ids, question_tokens: int, args) -> None:
        import torch

        from vllm_compact.benchmarks.capture import REPEAT_INSTRUCTION, TokenLayout, capture, config_rotary
        from tests.reference_llama import LayerCache

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
        from tests.reference_llama import LayerCache, compact_layer_cache

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
