"""compact_attention over paged per-head variable-length segments, and merge_attention.

The reference is checked against float64 attention over entries gathered one by one from the documented layout;
the Triton kernel against the reference.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_compact.kernels.compact_attention import compact_attention, compact_attention_ref, compact_attention_triton
from vllm_compact.kernels.merge import merge_attention

ca_module = importlib.import_module("vllm_compact.kernels.compact_attention")  # the package attribute is the function


@dataclass
class PagedCase:
    query: torch.Tensor
    kv_pages: torch.Tensor
    beta: torch.Tensor
    block_table: torch.Tensor
    beta_start: torch.Tensor
    head_start: torch.Tensor
    head_len: torch.Tensor
    query_req: torch.Tensor
    scale: float

    def args(self, device="cpu"):
        tensors = (self.query, self.kv_pages, self.beta, self.block_table, self.beta_start, self.head_start,
                   self.head_len, self.query_req)
        return (*(t.to(device) for t in tensors), self.scale)


def make_case(seed, head_lengths, q_heads, block_size, dim, n_tokens, *, magnitude=1.0, dtype=torch.float32):
    """Requests whose KV heads are packed one after another (with random gaps) over shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    n_requests, kv_heads = len(head_lengths), len(head_lengths[0])
    lanes = block_size * kv_heads
    head_start = torch.zeros(n_requests, kv_heads, dtype=torch.int32)
    pages_needed = []
    for r, lengths in enumerate(head_lengths):
        offset = int(torch.randint(0, 3, (1,), generator=g))
        for h, length in enumerate(lengths):
            head_start[r, h] = offset
            offset += length + int(torch.randint(0, 3, (1,), generator=g))
        pages_needed.append(max(1, -(-offset // lanes)))
    max_pages = max(pages_needed)
    num_blocks = sum(pages_needed) + 3
    pool = torch.randperm(num_blocks, generator=g)
    block_table = torch.full((n_requests, max_pages), -1, dtype=torch.int32)
    used = 0
    for r, count in enumerate(pages_needed):
        block_table[r, :count] = pool[used : used + count].int()
        used += count
    beta_start = torch.tensor([0] + [max_pages * lanes * (r + 1) + 5 * r for r in range(n_requests - 1)])
    beta = torch.randn(int(beta_start[-1]) + max_pages * lanes, generator=g)
    beta[torch.rand(beta.shape, generator=g) < 0.1] = float("-inf")  # padding-like entries
    kv_pages = torch.randn(num_blocks, lanes, 2, dim, generator=g).to(dtype)
    query = (torch.randn(n_tokens, q_heads, dim, generator=g) * magnitude).to(dtype)
    query_req = torch.randint(0, n_requests, (n_tokens,), generator=g).int()
    return PagedCase(query, kv_pages, beta, block_table, beta_start, head_start,
                     torch.tensor(head_lengths, dtype=torch.int32), query_req, 1.0 / math.sqrt(dim))


def dense_reference(case: PagedCase):
    """float64, one entry at a time from the layout rules in the contract."""
    n_tokens, q_heads, dim = case.query.shape
    kv_heads = case.head_start.shape[1]
    lanes = case.kv_pages.shape[1]
    out = torch.zeros(n_tokens, q_heads, dim, dtype=torch.float64)
    lse = torch.full((n_tokens, q_heads), -math.inf, dtype=torch.float64)
    for n in range(n_tokens):
        r = int(case.query_req[n])
        for j in range(q_heads):
            h = j // (q_heads // kv_heads)
            logits, values = [], []
            for i in range(int(case.head_len[r, h])):
                f = int(case.head_start[r, h]) + i
                page = int(case.block_table[r, f // lanes])
                bias = float(case.beta[int(case.beta_start[r]) + f])
                if bias == -math.inf:
                    continue
                key = case.kv_pages[page, f % lanes, 0].double()
                logits.append(case.scale * float(case.query[n, j].double() @ key) + bias)
                values.append(case.kv_pages[page, f % lanes, 1].double())
            if logits:
                top = max(logits)
                weights = torch.tensor([math.exp(x - top) for x in logits], dtype=torch.float64)
                lse[n, j] = top + math.log(float(weights.sum()))
                out[n, j] = (weights[:, None] * torch.stack(values)).sum(0) / weights.sum()
    return out, lse


def assert_matches(got, expected, atol=1e-5):
    out, lse = got
    exp_out, exp_lse = expected
    assert lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(exp_lse))
    torch.testing.assert_close(out.cpu().double(), exp_out, atol=atol, rtol=atol)
    finite = torch.isfinite(exp_lse)
    torch.testing.assert_close(lse.cpu().double()[finite], exp_lse[finite], atol=atol, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_requests=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    block_size=st.integers(1, 4),
    dim=st.integers(1, 8),
    n_tokens=st.integers(1, 6),
    data=st.data(),
)
def test_reference_matches_dense_float64(seed, n_requests, kv_heads, group, block_size, dim, n_tokens, data):
    lengths = data.draw(st.lists(st.lists(st.integers(0, 12), min_size=kv_heads, max_size=kv_heads),
                                 min_size=n_requests, max_size=n_requests))
    case = make_case(seed, lengths, kv_heads * group, block_size, dim, n_tokens)
    got = compact_attention_ref(*case.args())
    assert got[0].dtype == case.query.dtype
    assert_matches(got, dense_reference(case))


def test_zero_length_heads_give_zero_output_and_minus_inf_lse():
    case = make_case(1, [[0, 4], [0, 0]], 4, 2, 3, 5)
    out, lse = compact_attention_ref(*case.args())
    for n in range(5):
        r = int(case.query_req[n])
        assert (out[n, :2] == 0).all() and (lse[n, :2] == -math.inf).all()
        if r == 1:
            assert (out[n] == 0).all() and (lse[n] == -math.inf).all()
    assert_matches((out, lse), dense_reference(case))


def test_huge_logits_stay_finite():
    case = make_case(2, [[7, 3], [5, 9]], 4, 4, 6, 4, magnitude=1e4)
    out, lse = compact_attention_ref(*case.args())
    assert (lse[torch.isfinite(lse)].abs() > 1e3).any()  # the logits really were huge
    assert_matches((out, lse), dense_reference(case), atol=1e-4)


def test_reference_chunks_over_tokens_exactly(monkeypatch):
    case = make_case(3, [[6, 2, 9]], 6, 2, 4, 11)
    whole = compact_attention_ref(*case.args())
    monkeypatch.setattr(ca_module, "_REF_CHUNK_ELEMENTS", 6 * 9 * 2)  # 2 tokens per chunk
    chunked = compact_attention_ref(*case.args())
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


def test_bfloat16_pages():
    case = make_case(4, [[10, 3], [1, 8]], 4, 4, 16, 6, dtype=torch.bfloat16)
    out, lse = compact_attention_ref(*case.args())
    assert out.dtype == torch.bfloat16
    assert_matches((out.float(), lse), dense_reference(case), atol=1e-2)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("VLLM_COMPACT_TRITON", raising=False)
    monkeypatch.setattr(ca_module, "compact_attention_triton", None)  # would fail if called
    case = make_case(5, [[3, 2]], 2, 2, 4, 3)
    assert_matches(compact_attention(*case.args()), dense_reference(case))


# ------------------------------------------------------------------------------------------------- merge


def dense_attention(query, keys, values, bias):
    """float64 attention of [N,Hq,D] queries over one key set shared by all heads ([E,D], bias [E])."""
    logits = query.double() @ keys.double().T + bias.double()
    return torch.softmax(logits, dim=-1) @ values.double(), torch.logsumexp(logits, dim=-1)


def test_merge_of_disjoint_parts_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(6)
    query = torch.randn(5, 3, 4, generator=g)
    keys, values, bias = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g), torch.randn(9, generator=g)
    out_a, lse_a = dense_attention(query, keys[:4], values[:4], bias[:4])
    out_b, lse_b = dense_attention(query, keys[4:], values[4:], bias[4:])
    out, lse = merge_attention(out_a.float(), lse_a.float(), out_b.float(), lse_b.float())
    exp_out, exp_lse = dense_attention(query, keys, values, bias)
    torch.testing.assert_close(out.double(), exp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), exp_lse, atol=1e-5, rtol=1e-5)


def test_merge_with_empty_sides():
    out_a = torch.tensor([[[1.0, 2.0]], [[float("nan"), 0.0]], [[5.0, 5.0]]])
    lse_a = torch.tensor([[3.0], [-math.inf], [-math.inf]])
    out_b = torch.tensor([[[float("nan"), 1.0]], [[7.0, -1.0]], [[float("nan"), 1.0]]])
    lse_b = torch.tensor([[-math.inf], [1e4], [-math.inf]])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert out.tolist() == [[[1.0, 2.0]], [[7.0, -1.0]], [[0.0, 0.0]]]
    assert lse.tolist() == [[3.0], [1e4], [-math.inf]]


def test_merge_huge_lse_and_bfloat16_outputs():
    out_a = torch.full((1, 2, 3), 1.0, dtype=torch.bfloat16)
    out_b = torch.full((1, 2, 3), 3.0, dtype=torch.bfloat16)
    lse_a = torch.tensor([[1e4, 5.0]])
    lse_b = torch.tensor([[1e4, 5.0 + math.log(3.0)]])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.tensor([[[2.0] * 3, [2.5] * 3]]))
    torch.testing.assert_close(lse, torch.tensor([[1e4 + math.log(2.0), 5.0 + math.log(4.0)]]))


def test_compact_segment_merged_with_the_rest_equals_full_attention():
    """The engine's use: attention over [compact segment ; other keys] = merge of the two partial attentions."""
    case = make_case(7, [[6, 4]], 4, 4, 8, 3)
    out_c, lse_c = compact_attention_ref(*case.args())
    g = torch.Generator().manual_seed(8)
    other_k, other_v = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    out_o, lse_o = dense_attention(case.query * case.scale, other_k, other_v, torch.zeros(5))
    out, lse = merge_attention(out_c, lse_c, out_o.float(), lse_o.float())
    # Full attention per query head over the compact entries of its KV head plus the shared other keys.
    dense_c_out, dense_c_lse = dense_reference(case)
    w_c, w_o = torch.exp(dense_c_lse), torch.exp(lse_o)
    expected = (w_c[..., None] * dense_c_out + w_o[..., None] * out_o) / (w_c + w_o)[..., None]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), torch.log(w_c + w_o), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ Triton vs reference


@pytest.mark.triton_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(triton_device, dtype):
    # GQA group 7 (Qwen2.5-0.5B), a head longer than one 64-entry block, zero-length heads, pages of 4 tokens.
    lengths = [[70, 0], [3, 131], [0, 0]]
    case = make_case(9, lengths, 14, 4, 20, 7, dtype=dtype)
    expected = compact_attention_ref(*case.args())
    got = compact_attention_triton(*case.args(triton_device))
    assert got[0].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[0].cpu().float(), expected[0].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got[1].cpu(), expected[1], atol=1e-5 if dtype == torch.float32 else 1e-3, rtol=1e-5)


@pytest.mark.triton_kernel
def test_triton_huge_logits_and_single_entries(triton_device):
    case = make_case(10, [[1, 2], [5, 1]], 4, 1, 16, 5, magnitude=1e4)
    expected = compact_attention_ref(*case.args())
    got = compact_attention_triton(*case.args(triton_device))
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()
    torch.testing.assert_close(got[0].cpu(), expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].cpu(), expected[1], atol=1e-2, rtol=1e-6)
