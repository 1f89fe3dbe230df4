"""Times each Triton kernel against its torch reference on CUDA at Qwen2.5-0.5B shapes and checks the error.

    pip install --no-deps --no-build-isolation -e .   # no vLLM needed: maps kernels/ to vllm_compact.kernels
    python3 -m vllm_compact.kernels.bench_kernels --out DIR

Shapes (Qwen2.5-0.5B): 24 layers x 2 KV heads = 48 heads, head_dim 64, GQA group 7, a 32768-token span, 4096
pooled reference queries per KV head, compact budget t = T/10; compact_attention: 64 decode requests (one query
each, 14 query heads) over 10x-compacted 32K segments with per-head lengths, block_size 16. Writes
bench_kernels.json and bench_kernels.md into DIR. `--tiny --device cpu` (with TRITON_INTERPRET=1) is a dry run of
the script itself at toy sizes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from vllm_compact.kernels.compact_attention import compact_attention_ref, compact_attention_triton
from vllm_compact.kernels.key_scores import key_scores_ref, key_scores_triton
from vllm_compact.kernels.lstsq import transposed_product_triton, value_lstsq_ref, value_lstsq_triton
from vllm_compact.kernels.nnls import nnls_pg_ref, nnls_pg_triton

LOWER, UPPER = math.exp(-3), math.exp(3)


@dataclass(frozen=True)
class BenchShape:
    heads: int = 48  # 24 layers x 2 KV heads
    dim: int = 64
    group: int = 7  # 14 query heads / 2 KV heads
    kv_heads_per_layer: int = 2
    span: int = 32768
    queries: int = 4096
    ratio: int = 10
    block_size: int = 16
    decode_requests: int = 64

    @property
    def budget(self) -> int:
        return self.span // self.ratio


QWEN_0_5B = BenchShape()
TINY = BenchShape(heads=4, span=640, queries=96, decode_requests=3)


@dataclass
class KernelResult:
    name: str
    shape: str
    triton_ms: float
    ref_ms: float
    first_call_s: float  # Triton's first call, compilation included
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.ref_ms / self.triton_ms if self.triton_ms > 0 else float("nan")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median of `reps` timings after one warm-up call (CUDA events on a GPU, the host clock otherwise)."""
    fn()
    synchronize()
    samples = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(stop))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def first_call_s(fn: Callable[[], Any]) -> float:
    synchronize()
    begin = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - begin


def relative_max_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    finite = torch.isfinite(ref)
    diff = (got.float() - ref.float())[finite].abs().max().item()
    return diff / max(ref.float()[finite].abs().max().item(), 1e-30)


@dataclass
class BenchContext:
    shape: BenchShape
    device: torch.device
    reps: int
    gen: torch.Generator

    def randn(self, *size: int) -> torch.Tensor:
        return torch.randn(*size, device=self.device, generator=self.gen)

    def randint(self, low: int, high: int, size: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(low, high, size, device=self.device, generator=self.gen)

    def budget_mask(self, cols: int) -> torch.Tensor:
        """Per-head valid columns (nonuniform budgets between t/2 and t)."""
        budget = self.randint(cols // 2, cols + 1, (self.shape.heads,))
        return torch.arange(cols, device=self.device)[None, :] < budget[:, None]


def bench_key_scores(ctx: BenchContext) -> KernelResult:
    sh = ctx.shape
    q = ctx.randn(sh.heads, sh.queries, sh.dim).bfloat16()
    k = ctx.randn(sh.heads, sh.span, sh.dim).bfloat16()
    key_len = ctx.randint(sh.span * 9 // 10, sh.span + 1, (sh.heads,))
    scale = 1.0 / math.sqrt(sh.dim)
    run_triton = lambda: key_scores_triton(q, k, scale, key_len=key_len)
    run_ref = lambda: key_scores_ref(q, k, scale, key_len=key_len)
    compile_s = first_call_s(run_triton)
    got, ref = run_triton(), run_ref()
    errors = {
        "scores_max_rel": relative_max_error(got.scores, ref.scores),
        "lse_max_abs": (got.lse - ref.lse).abs().max().item(),
        "nan_count": int(torch.isnan(got.scores).sum() + torch.isnan(got.lse).sum()),
        "topk_overlap": _topk_overlap(got.scores, ref.scores, sh.budget),
    }
    return KernelResult("key_scores", f"H={sh.heads} N={sh.queries} T={sh.span} D={sh.dim} bf16",
                        time_ms(run_triton, ctx.reps), time_ms(run_ref, max(1, ctx.reps // 2)), compile_s, errors)


def _topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean fraction of the top-k keys both score vectors select (what key selection actually uses)."""
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return ((top_a & top_b).sum(dim=1).float() / k).mean().item()


def bench_nnls(ctx: BenchContext) -> list[KernelResult]:
    sh = ctx.shape
    logits = ctx.randn(sh.heads, sh.queries, sh.budget) * 1.5
    M = torch.exp(logits - logits.amax(dim=2, keepdim=True))  # like exp(s q c - rowmax)
    del logits
    w_true = torch.exp(ctx.randn(sh.heads, sh.budget))
    m = (M @ w_true[:, :, None])[:, :, 0] * (1 + 0.05 * ctx.randn(sh.heads, sh.queries))
    col_mask = ctx.budget_mask(sh.budget)
    kwargs = dict(lower=LOWER, upper=UPPER, col_mask=col_mask, pg_iters=2, power_iters=3)
    run_triton = lambda: nnls_pg_triton(M, m, **kwargs)
    run_ref = lambda: nnls_pg_ref(M, m, **kwargs)
    compile_s = first_call_s(run_triton)
    got, ref = run_triton(), run_ref()
    residual = lambda w: torch.linalg.vector_norm(torch.bmm(M, w[:, :, None])[:, :, 0] - m, dim=1)
    errors = {
        "w_max_rel": relative_max_error(got, ref),
        "residual_ratio_max": (residual(got) / residual(ref)).max().item(),
        "nan_count": int(torch.isnan(got).sum()),
    }
    shape = f"H={sh.heads} N={sh.queries} t<={sh.budget} fp32"
    whole = KernelResult("nnls_pg (whole op)", shape, time_ms(run_triton, ctx.reps), time_ms(run_ref, ctx.reps),
                         compile_s, errors)
    return [whole, _bench_projected_gradient(ctx, M, m, col_mask)]


def _bench_projected_gradient(ctx: BenchContext, M: torch.Tensor, m: torch.Tensor, col_mask: torch.Tensor) -> KernelResult:
    """The projected-gradient part alone (3 power iterations + 2 steps): Triton loop vs torch bmm loop."""
    nnls = importlib.import_module("vllm_compact.kernels.nnls")
    G = torch.bmm(M.transpose(1, 2), M)
    b = torch.bmm(M.transpose(1, 2), m[:, :, None])[:, :, 0]
    w0 = torch.rand(b.shape, device=ctx.device, generator=ctx.gen) * 2

    def torch_loop() -> torch.Tensor:
        eta = nnls.step_size(G, col_mask, 3)
        w = w0
        for _ in range(2):
            w = (w - eta[:, None] * (torch.bmm(G, w[:, :, None])[:, :, 0] - b)).clamp(LOWER, UPPER)
        return torch.where(col_mask, w, 0.0)

    def triton_loop() -> torch.Tensor:
        w = w0.clone()
        valid = col_mask.to(torch.int8)
        scratch = torch.empty(G.shape[0], 2, G.shape[1], device=ctx.device)
        nnls.jit(nnls._projected_gradient)[(G.shape[0],)](
            G, b, valid, w, scratch, G.shape[1], LOWER, UPPER, 1.0, 3, 2, *G.stride(), b.stride(0),
            valid.stride(0), w.stride(0), scratch.stride(0), scratch.stride(1), BLOCK_R=64, BLOCK_C=128, num_warps=8,
        )
        return w

    compile_s = first_call_s(triton_loop)
    errors = {"w_max_rel": relative_max_error(triton_loop(), torch_loop())}
    return KernelResult("nnls projected-gradient loop", f"H={G.shape[0]} t={G.shape[1]} (G given)",
                        time_ms(triton_loop, ctx.reps), time_ms(torch_loop, ctx.reps), compile_s, errors)


def bench_lstsq(ctx: BenchContext) -> list[KernelResult]:
    sh = ctx.shape
    X = torch.softmax(ctx.randn(sh.heads, sh.queries, sh.budget) * 2.0, dim=2)
    Y = ctx.randn(sh.heads, sh.queries, sh.dim)
    col_mask = ctx.budget_mask(sh.budget)
    run_triton = lambda: value_lstsq_triton(X, Y, ridge=1e-3, col_mask=col_mask)
    run_ref = lambda: value_lstsq_ref(X, Y, ridge=1e-3, col_mask=col_mask)
    compile_s = first_call_s(run_triton)
    got, ref = run_triton(), run_ref()
    residual = lambda C: torch.linalg.matrix_norm(torch.bmm(X * col_mask[:, None, :], C) - Y)
    errors = {
        "solution_max_rel": relative_max_error(got.solution, ref.solution),
        "residual_ratio_max": (residual(got.solution) / residual(ref.solution)).max().item(),
        "failed_heads": int(got.failed.sum()),
    }
    shape = f"H={sh.heads} N={sh.queries} t<={sh.budget} D={sh.dim} fp32"
    whole = KernelResult("value_lstsq (whole op)", shape, time_ms(run_triton, ctx.reps),
                         time_ms(run_ref, ctx.reps), compile_s, errors)
    gram_triton = lambda: transposed_product_triton(X, None, None)
    gram_torch = lambda: torch.bmm(X.transpose(1, 2), X)
    gram_compile = first_call_s(gram_triton)
    gram_errors = {"gram_max_rel": relative_max_error(gram_triton(), gram_torch())}
    gram = KernelResult("gram X^T X (Triton tf32x3 vs torch fp32 bmm)", f"H={sh.heads} N={sh.queries} t={sh.budget}",
                        time_ms(gram_triton, ctx.reps), time_ms(gram_torch, ctx.reps), gram_compile, gram_errors)
    return [whole, gram]


def _decode_case(ctx: BenchContext) -> tuple:
    """Decode requests, each with a compacted segment whose per-head lengths vary (nonuniform budgets)."""
    sh = ctx.shape
    requests, kv_heads = sh.decode_requests, sh.kv_heads_per_layer
    lanes = sh.block_size * kv_heads
    head_len = ctx.randint(sh.budget // 2, sh.budget * 3 // 2, (requests, kv_heads)).int()
    head_start = torch.zeros_like(head_len)
    head_start[:, 1:] = torch.cumsum(head_len, dim=1)[:, :-1]
    max_pages = int(((head_len.sum(dim=1) + lanes - 1) // lanes).max())
    num_blocks = requests * max_pages
    block_table = torch.randperm(num_blocks, device=ctx.device, generator=ctx.gen).int().view(requests, max_pages)
    kv_pages = ctx.randn(num_blocks, lanes, 2, sh.dim).bfloat16()
    beta_start = torch.arange(requests, device=ctx.device) * max_pages * lanes
    beta = ctx.randn(requests * max_pages * lanes)
    query = ctx.randn(requests, kv_heads * sh.group, sh.dim).bfloat16()
    query_req = torch.arange(requests, device=ctx.device).int()
    return query, kv_pages, beta, block_table, beta_start, head_start, head_len, query_req, 1.0 / math.sqrt(sh.dim)


def bench_compact_attention(ctx: BenchContext) -> KernelResult:
    sh = ctx.shape
    args = _decode_case(ctx)
    run_triton = lambda: compact_attention_triton(*args)
    run_ref = lambda: compact_attention_ref(*args)
    compile_s = first_call_s(run_triton)
    (out, lse), (ref_out, ref_lse) = run_triton(), run_ref()
    errors = {
        "out_max_abs": (out.float() - ref_out.float()).abs().max().item(),
        "lse_max_abs": (lse - ref_lse).abs().max().item(),
        "nan_count": int(torch.isnan(out).sum() + torch.isnan(lse).sum()),
    }
    shape = (f"{sh.decode_requests} decode queries x {sh.kv_heads_per_layer * sh.group} heads, "
             f"~{sh.budget} entries/KV head, block {sh.block_size}, bf16")
    return KernelResult("compact_attention", shape, time_ms(run_triton, ctx.reps * 4), time_ms(run_ref, ctx.reps),
                        compile_s, errors)


def render_markdown(results: list[KernelResult], meta: dict[str, Any]) -> str:
    lines = [
        "# Kernel benchmark: Triton vs torch reference",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}. Median of timings (CUDA events on a GPU) "
        "after one warm-up; errors are Triton vs the reference on the same inputs.",
        "",
        "| kernel | shape | Triton ms | torch ms | speedup | first call s | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        errs = ", ".join(f"{k}={v:.3g}" for k, v in r.errors.items())
        lines.append(f"| {r.name} | {r.shape} | {r.triton_ms:.2f} | {r.ref_ms:.2f} | {r.speedup:.1f}x | "
                     f"{r.first_call_s:.1f} | {errs} |")
    if meta.get("failures"):
        lines += ["", "Failures:", *(f"- {name}: {msg}" for name, msg in meta["failures"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="kernel groups to run (default: all)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run under TRITON_INTERPRET=1")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (dry run of the script)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device (or --device cpu --tiny with TRITON_INTERPRET=1)")
    import triton

    ctx = BenchContext(TINY if args.tiny else QWEN_0_5B, device, args.reps,
                       torch.Generator(device=device).manual_seed(0))
    groups: dict[str, Callable[[BenchContext], KernelResult | list[KernelResult]]] = {
        "key_scores": bench_key_scores,
        "nnls": bench_nnls,
        "lstsq": bench_lstsq,
        "compact_attention": bench_compact_attention,
    }
    results: list[KernelResult] = []
    failures: dict[str, str] = {}
    for name, run in groups.items():
        if args.only and name not in args.only:
            continue
        try:
            out = run(ctx)
            results += out if isinstance(out, list) else [out]
            print(f"{name}: done", flush=True)
        except Exception as exc:  # report and go on: one failing kernel must not hide the others' figures
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: FAILED {failures[name]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'} (interpreter)"
    meta = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "shape": asdict(ctx.shape), "failures": failures}
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [asdict(r) | {"speedup": r.speedup} for r in results]}
    (args.out / "bench_kernels.json").write_text(json.dumps(payload, indent=2))
    markdown = render_markdown(results, meta)
    (args.out / "bench_kernels.md").write_text(markdown)
    print(markdown)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
