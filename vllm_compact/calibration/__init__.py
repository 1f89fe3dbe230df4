"""`vllm-compact calibrate MODEL`: a per-(layer, KV head) budget table measured on real text.

The method: the paper's sensitivity calibration and greedy exchange, with a held-out objective
------------------------------------------------------------------------------------------------
The paper (design note section 5) holds every head at a uniform ratio, sweeps each head's budget, records the
change in log-perplexity of reference answers, and then moves budget greedily from the cheapest donor to the
most-benefiting recipient, averaged over target ratios. Here, per (layer, KV head) and per context of essay text
(vllm_compact/data/essays.py, spread evenly over the first nine tenths of the corpus; `--evaluate` scores a
table on the last tenth), with the token layout the engine compacts (`--protected` head | span | `--recent`
window | `--window` held-out tokens), keys and queries post-RoPE as the model computes them (transformers, fp32, one forward per context):

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
(coverage_curve), maximised by a greedy; it is not the default (docs/research-2026-12.md compares the two). `keys_needed` (keys for `--share` of a head's held-out mass) is recorded as a
readable diagnostic of how diffuse each head is.

Where budget moves: `--scope layer` (default, shipped) redistributes only among the KV heads of a layer: every
layer's row sums to 1 / num_layers, so every layer keeps exactly the uniform total. This is a memory decision:
HeadBudgetPolicy packs a layer's heads back to back and the FULLEST layer decides the page count for every layer
(pages are allocated for all layers at once), so moving budget from one layer to another costs pages the
receiving layer's peers leave empty. With a layer-scoped table the engine distributes per layer, and the pages
and physical tokens equal uniform's exactly. `--scope model` lets budget move across layers too; the command
prints what that costs in pages at the same nominal ratio. The memory report uses the engine's HeadBudgetPolicy.
"""
