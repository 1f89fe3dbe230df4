"""The probed decoder of vLLM's packed CPU KV pages reads back exactly what vLLM's own cache writer stored."""

from __future__ import annotations

import pytest
import torch

from vllm_compact.vllm_compat import patch_vllm_version

patch_vllm_version()

from vllm import _custom_ops as ops  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: E402

from vllm_compact.integration.block_probe import stock_block_layout  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,block_size,head_dim", [(3, 32, 64), (2, 64, 32), (1, 128, 128)])
def test_read_returns_written_tokens(dtype, num_kv_heads, block_size, head_dim):
    isa = _get_attn_isa(dtype, block_size, head_dim, "auto")
    layout = stock_block_layout(num_kv_heads, block_size, head_dim, dtype, isa)
    cache = torch.zeros(5, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = cache.view(5, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    tokens = 2 * block_size + 7
    keys = torch.randn(tokens, num_kv_heads, head_dim).to(dtype)
    values = torch.randn(tokens, num_kv_heads, head_dim).to(dtype)
    blocks = [4, 1, 3]  # non-contiguous, out of order
    slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size for i in range(tokens)])
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    read_k, read_v = layout.read(cache, torch.tensor(blocks))
    assert torch.equal(read_k[:, :tokens], keys.transpose(0, 1))
    assert torch.equal(read_v[:, :tokens], values.transpose(0, 1))

