"""The worker reads the model's RoPE from vLLM's own rotary modules: it undoes what stock vLLM applies."""

from __future__ import annotations

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

from vllm_compact.integration.worker import model_rotary


def _rope(base: float, neox: bool, rotary_dim: int, head_size: int = 16) -> RotaryEmbedding:
    with set_current_vllm_config(VllmConfig()):  # a CustomOp reads the config it is built under
        return RotaryEmbedding(head_size=head_size, rotary_dim=rotary_dim, max_position_embeddings=256, base=base,
                               is_neox_style=neox, dtype=torch.float32)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_model_rotary_undoes_the_rotation_vllm_applies(neox: bool, rotary_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    rope = _rope(10000.0, neox, rotary_dim)
    heads, length, head_size = 2, 30, 16
    positions = torch.randint(0, 256, (length,), generator=g)
    keys = torch.randn(length, heads * head_size, generator=g)
    _, rotated = rope.forward_native(positions, keys.clone(), keys.clone())
    rotated = rotated.view(length, heads, head_size).transpose(0, 1)
    assert not torch.allclose(rotated, keys.view(length, heads, head_size).transpose(0, 1), atol=1e-2)
    rotary = model_rotary(torch.nn.ModuleList([rope, rope]))
    restored = rotary.unrotate(rotated, positions.expand(heads, -1))
    assert torch.allclose(restored, keys.view(length, heads, head_size).transpose(0, 1), atol=1e-5)


def test_layers_that_rotate_differently_give_no_rotary() -> None:
    assert model_rotary(torch.nn.ModuleList([_rope(10000.0, True, 16), _rope(500000.0, True, 16)])) is None
    assert model_rotary(torch.nn.Linear(2, 2)) is None
