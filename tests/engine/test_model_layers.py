"""Unit parity of the thinker's norm and rotary embedding against HF transformers (the MoE block: test_moe.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3OmniMoeTextConfig
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

from omnistream.engine.model_executor.layers.norm import RMSNorm, rms_norm_heads_
from omnistream.engine.model_executor.layers.rotary import (
    MRotaryEmbedding,
    apply_rotary,
    apply_rotary_,
    mrope_rows,
)


def hf_text_config(**overrides) -> Qwen3OmniMoeTextConfig:
    values = dict(
        vocab_size=1000, hidden_size=64, moe_intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[24, 20, 20]),
    )
    values.update(overrides)
    config = Qwen3OmniMoeTextConfig(**values)
    config._experts_implementation = "eager"
    return config


def test_mrope_rows_match_doc_for_real_sections():
    rows = mrope_rows((24, 20, 20))
    assert torch.nonzero(rows == 0).flatten().tolist() == list(range(0, 60, 3)) + [60, 61, 62, 63]
    assert torch.nonzero(rows == 1).flatten().tolist() == list(range(1, 60, 3))
    assert torch.nonzero(rows == 2).flatten().tolist() == list(range(2, 60, 3))


@pytest.mark.parametrize("section, head_dim", [((24, 20, 20), 128), ((12, 10, 10), 64), ((6, 5, 5), 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mrope_cos_sin_match_hf_for_distinct_rows(section, head_dim, dtype):
    config = hf_text_config(head_dim=head_dim, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                    mrope_section=list(section)))
    reference = hf.Qwen3OmniMoeThinkerTextRotaryEmbedding(config)
    positions = torch.randint(0, 5000, (3, 50), generator=torch.Generator().manual_seed(0))
    x = torch.zeros(1, 50, 8, dtype=dtype)
    hf_cos, hf_sin = reference(x, positions.unsqueeze(1).float())
    cos, sin = MRotaryEmbedding(head_dim, 1e6, section)(positions, dtype)
    assert cos.dtype == dtype
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    q = torch.randn(50, 3, head_dim).to(dtype)
    hf_q, _ = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], hf_cos, hf_sin)
    assert torch.equal(apply_rotary(q, cos, sin), hf_q[0].transpose(0, 1))


def test_mrope_one_dim_positions_are_equal_rows():
    rope = MRotaryEmbedding(64, 1e6, (12, 10, 10))
    positions = torch.arange(20)
    for a, b in zip(rope(positions, torch.float32), rope(positions.expand(3, -1), torch.float32)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf(dtype):
    reference = hf.Qwen3OmniMoeThinkerTextRMSNorm(64, eps=1e-6)
    ours = RMSNorm(64, eps=1e-6)
    weight = torch.randn(64)
    reference.weight.data.copy_(weight)
    ours.weight.data.copy_(weight)
    reference.to(dtype)
    ours.to(dtype)
    x = (torch.randn(7, 3, 64) * 3).to(dtype)
    assert torch.equal(ours(x), reference(x))


def _qkv_views(dtype: torch.dtype, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A projection output [T, (heads + 2) * head_dim] and its q [T, heads, D] and k [T, 1, D] views (strided)."""
    qkv = (torch.randn(11, (heads + 2) * head_dim, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, head_dim, head_dim], dim=-1)
    return qkv, q.view(11, heads, head_dim), k.view(11, 1, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_on_strided_views_equals_the_out_of_place_rotation(dtype):
    cos, sin = MRotaryEmbedding(64, 1e6, (12, 10, 10))(torch.randint(0, 5000, (3, 11)), dtype)
    qkv, q, k = _qkv_views(dtype, 4, 64)
    expected_q, expected_k, untouched = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), qkv[:, 5 * 64 :].clone()
    assert apply_rotary_(q, cos, sin) is q and apply_rotary_(k, cos, sin) is k
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[:, 5 * 64 :], untouched)  # v is not written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_in_place_on_strided_views_equals_forward(dtype):
    norm = RMSNorm(64, eps=1e-6)
    norm.weight.data.copy_(torch.randn(64))
    norm.to(dtype)
    qkv, q, k = _qkv_views(dtype, 4, 64)
    expected_q, expected_k, untouched = norm(q), norm(k), qkv[:, 5 * 64 :].clone()
    assert norm.forward_(q) is q and norm.forward_(k) is k
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[:, 5 * 64 :], untouched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q_and_k_heads_normalised_together_equal_each_norm_on_its_heads(dtype):
    q_norm, k_norm = RMSNorm(64, eps=1e-6), RMSNorm(64, eps=1e-6)
    q_norm.weight.data.copy_(torch.randn(64))
    k_norm.weight.data.copy_(torch.randn(64))
    q_norm.to(dtype)
    k_norm.to(dtype)
    qkv, q, k = _qkv_views(dtype, 4, 64)
    expected_q, expected_k, untouched = q_norm(q), k_norm(k), qkv[:, 5 * 64 :].clone()
    qk = qkv[:, : 5 * 64].view(11, 5, 64)
    assert rms_norm_heads_(qk, (q_norm, k_norm), (4, 1)) is qk
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(qkv[:, 5 * 64 :], untouched)
    with pytest.raises(ValueError, match="share eps"):
        rms_norm_heads_(qk, (q_norm, RMSNorm(64, eps=1e-5)), (4, 1))
