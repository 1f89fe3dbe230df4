"""key_scores: the torch reference against plain float64 math, and the Triton kernel against the reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_compact.kernels.key_scores import key_scores, key_scores_ref, key_scores_triton

ks_module = importlib.import_module("vllm_compact.kernels.key_scores")  # the package attribute is the function


def dense_key_scores(queries, keys, scale, query_len, key_len, key_bias, query_pos, key_pos, reduce):
    """Plain float64 per head and per query: softmax over visible keys, then the reduction over seeing queries."""
    heads, n_queries, _ = queries.shape
    n_keys = keys.shape[1]
    scores = torch.zeros(heads, n_keys, dtype=torch.float64)
    lse = torch.full((heads, n_queries), -math.inf, dtype=torch.float64)
    for h in range(heads):
        s = float(scale[h]) if isinstance(scale, torch.Tensor) else scale
        rows = []
        for i in range(int(query_len[h])):
            visible = [
                j for j in range(int(key_len[h]))
                if (query_pos is None or key_pos[h, j] <= query_pos[h, i])
                and (key_bias is None or key_bias[h, j] != -math.inf)
            ]
            if not visible:
                continue
            logits = torch.zeros(n_keys, dtype=torch.float64)
            for j in visible:
                logits[j] = s * torch.dot(queries[h, i].double(), keys[h, j].double())
                if key_bias is not None:
                    logits[j] += float(key_bias[h, j])
            top = max(float(logits[j]) for j in visible)
            total = sum(math.exp(float(logits[j]) - top) for j in visible)
            lse[h, i] = top + math.log(total)
            probs = torch.zeros(n_keys, dtype=torch.float64)
            for j in visible:
                probs[j] = math.exp(float(logits[j]) - lse[h, i])
            rows.append(probs)
        if rows:
            A = torch.stack(rows)
            if reduce == "rms":
                scores[h] = A.square().mean(0).sqrt()
            elif reduce == "mean":
                scores[h] = A.mean(0)
            else:
                scores[h] = A.amax(0)
    return scores, lse


def random_case(seed, heads, n_queries, n_keys, dim, *, causal, bias, lengths, scale_tensor=False, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(heads, n_queries, dim, generator=g) * magnitude
    keys = torch.randn(heads, n_keys, dim, generator=g)
    kwargs = {}
    if lengths:
        kwargs["query_len"] = torch.randint(0, n_queries + 1, (heads,), generator=g)
        kwargs["key_len"] = torch.randint(0, n_keys + 1, (heads,), generator=g)
    if bias:
        key_bias = torch.randn(heads, n_keys, generator=g)
        key_bias[torch.rand(heads, n_keys, generator=g) < 0.15] = -math.inf  # padding entries of an old compaction
        kwargs["key_bias"] = key_bias
    if causal:
        kwargs["key_pos"] = torch.randint(0, 2 * n_keys, (heads, n_keys), generator=g)
        kwargs["query_pos"] = torch.randint(0, 2 * n_keys, (heads, n_queries), generator=g)
    scale = torch.rand(heads, generator=g) + 0.2 if scale_tensor else 1.0 / math.sqrt(dim)
    return queries, keys, scale, kwargs


def check_against_dense(result, queries, keys, scale, kwargs, reduce, atol=1e-5):
    heads, n_queries, _ = queries.shape
    n_keys = keys.shape[1]
    query_len = kwargs.get("query_len", torch.full((heads,), n_queries))
    key_len = kwargs.get("key_len", torch.full((heads,), n_keys))
    scores, lse = dense_key_scores(
        queries, keys, scale, query_len, key_len, kwargs.get("key_bias"), kwargs.get("query_pos"),
        kwargs.get("key_pos"), reduce,
    )
    assert result.scores.dtype == torch.float32 and result.lse.dtype == torch.float32
    assert not torch.isnan(result.scores).any() and not torch.isnan(result.lse).any()
    torch.testing.assert_close(result.scores.double(), scores, atol=atol, rtol=1e-4)
    assert torch.equal(torch.isinf(result.lse), torch.isinf(lse))
    finite = torch.isfinite(lse)
    torch.testing.assert_close(result.lse.double()[finite], lse[finite], atol=atol, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    heads=st.integers(1, 3),
    n_queries=st.integers(1, 9),
    n_keys=st.integers(1, 12),
    dim=st.integers(1, 8),
    causal=st.booleans(),
    bias=st.booleans(),
    lengths=st.booleans(),
    scale_tensor=st.booleans(),
    reduce=st.sampled_from(["rms", "mean", "max"]),
)
def test_reference_matches_dense_float64(seed, heads, n_queries, n_keys, dim, causal, bias, lengths, scale_tensor, reduce):
    queries, keys, scale, kwargs = random_case(
        seed, heads, n_queries, n_keys, dim, causal=causal, bias=bias, lengths=lengths, scale_tensor=scale_tensor
    )
    result = key_scores_ref(queries, keys, scale, reduce=reduce, **kwargs)
    check_against_dense(result, queries, keys, scale, kwargs, reduce)


def test_reference_chunks_over_queries_exactly(monkeypatch):
    queries, keys, scale, kwargs = random_case(3, 2, 23, 11, 5, causal=True, bias=True, lengths=True)
    whole = key_scores_ref(queries, keys, scale, reduce="rms", **kwargs)
    monkeypatch.setattr(ks_module, "_REF_CHUNK_ELEMENTS", 2 * 11 * 4)  # 4 queries per chunk
    chunked = key_scores_ref(queries, keys, scale, reduce="rms", **kwargs)
    torch.testing.assert_close(chunked.scores, whole.scores)
    torch.testing.assert_close(chunked.lse, whole.lse)


def test_huge_logits_stay_finite():
    queries, keys, scale, kwargs = random_case(5, 2, 6, 9, 4, causal=False, bias=True, lengths=False, magnitude=5e3)
    result = key_scores_ref(queries, keys, 1.0, reduce="rms", **kwargs)
    check_against_dense(result, queries, keys, 1.0, kwargs, "rms", atol=1e-3)
    assert torch.isfinite(result.scores).all()
    assert (result.lse.abs() > 1e3).any()  # the logits really were huge


def test_single_query_single_key():
    queries = torch.tensor([[[2.0, -1.0]]])
    keys = torch.tensor([[[0.5, 3.0]]])
    result = key_scores_ref(queries, keys, 0.5, key_bias=torch.tensor([[0.25]]))
    assert result.scores.tolist() == [[1.0]]
    assert result.lse.tolist() == [[pytest.approx(0.5 * (1.0 - 3.0) + 0.25)]]


def test_blind_and_invalid_rows():
    """Rows that see no key have lse -inf and do not count in the mean; invalid keys score 0."""
    queries = torch.ones(1, 3, 2)
    keys = torch.ones(1, 4, 2)
    result = key_scores_ref(
        queries, keys, 1.0, query_len=torch.tensor([2]), key_len=torch.tensor([3]),
        query_pos=torch.tensor([[5, -1, 7]]), key_pos=torch.tensor([[0, 1, 2, 3]]), reduce="mean",
    )
    assert result.lse[0, 1] == -math.inf and result.lse[0, 2] == -math.inf  # blind (causal) and invalid
    torch.testing.assert_close(result.lse[0, 0], torch.tensor(2.0 + math.log(3.0)))  # q.k = 2 for 3 keys
    torch.testing.assert_close(result.scores, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]))


def test_bfloat16_inputs_accumulate_in_float32():
    queries, keys, scale, kwargs = random_case(8, 2, 7, 10, 16, causal=False, bias=False, lengths=True)
    q16, k16 = queries.bfloat16(), keys.bfloat16()
    result = key_scores_ref(q16, k16, scale, **kwargs)
    check_against_dense(result, q16.double(), k16.double(), scale, kwargs, "rms", atol=1e-5)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("VLLM_COMPACT_TRITON", raising=False)
    queries, keys, scale, kwargs = random_case(9, 2, 5, 6, 4, causal=True, bias=True, lengths=True)
    monkeypatch.setattr(ks_module, "key_scores_triton", None)  # would fail if called
    result = key_scores(queries, keys, scale, reduce="max", **kwargs)
    check_against_dense(result, queries, keys, scale, kwargs, "max")


# ------------------------------------------------------------------------------------ Triton vs reference


@pytest.mark.triton_kernel
@pytest.mark.parametrize(
    "reduce,causal,bias,lengths",
    [("rms", True, True, True), ("mean", False, True, False), ("max", True, False, True)],
)
def test_triton_matches_reference(triton_device, reduce, causal, bias, lengths):
    # Sizes past one 64-block in both N and T, with ragged tails.
    queries, keys, scale, kwargs = random_case(
        11, 3, 70, 75, 20, causal=causal, bias=bias, lengths=lengths, scale_tensor=True
    )
    expected = key_scores_ref(queries, keys, scale, reduce=reduce, **kwargs)
    to_dev = {k: v.to(triton_device) for k, v in kwargs.items()}
    scale_dev = scale.to(triton_device)
    got = key_scores_triton(queries.to(triton_device), keys.to(triton_device), scale_dev, reduce=reduce, **to_dev)
    torch.testing.assert_close(got.scores.cpu(), expected.scores, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(got.lse.cpu(), expected.lse, atol=1e-5, rtol=1e-5)


@pytest.mark.triton_kernel
def test_triton_huge_logits_and_tiny_shapes(triton_device):
    for n_queries, n_keys, magnitude in ((1, 1, 1.0), (3, 2, 1e4)):
        queries, keys, _, kwargs = random_case(13, 2, n_queries, n_keys, 3, causal=False, bias=True, lengths=False,
                                               magnitude=magnitude)
        expected = key_scores_ref(queries, keys, 1.0, **kwargs)
        got = key_scores_triton(queries.to(triton_device), keys.to(triton_device), 1.0,
                                key_bias=kwargs["key_bias"].to(triton_device))
        assert not torch.isnan(got.scores).any() and not torch.isnan(got.lse).any()
        torch.testing.assert_close(got.scores.cpu(), expected.scores, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.lse.cpu(), expected.lse, atol=1e-2, rtol=1e-5)


@pytest.mark.triton_kernel
def test_triton_bfloat16(triton_device):
    queries, keys, scale, kwargs = random_case(17, 2, 33, 40, 64, causal=True, bias=True, lengths=True)
    q16, k16 = queries.bfloat16(), keys.bfloat16()
    expected = key_scores_ref(q16, k16, scale, **kwargs)
    got = key_scores_triton(q16.to(triton_device), k16.to(triton_device), scale,
                            **{k: v.to(triton_device) for k, v in kwargs.items()})
    torch.testing.assert_close(got.scores.cpu(), expected.scores, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(got.lse.cpu(), expected.lse, atol=1e-4, rtol=1e-4)


@pytest.mark.triton_kernel
def test_dispatcher_forced_triton(triton_device, monkeypatch):
    monkeypatch.setenv("VLLM_COMPACT_TRITON", "1")
    queries, keys, scale, kwargs = random_case(19, 1, 5, 6, 4, causal=False, bias=False, lengths=False)
    calls = []
    monkeypatch.setattr(ks_module, "key_scores_triton", lambda *a, **k: calls.append(1) or key_scores_triton(*a, **k))
    got = key_scores(queries.to(triton_device), keys.to(triton_device), scale)
    assert calls == [1]
    torch.testing.assert_close(got.scores.cpu(), key_scores_ref(queries, keys, scale).scores, atol=1e-6, rtol=1e-5)
