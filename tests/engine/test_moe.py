"""The sparse MoE block equals transformers' eager expert loop bit for bit on CPU, in fp32 and bf16, and never
asks the host anything: it runs on the `meta` device without creating a host tensor, and compiles to one graph.
The grouped GEMM op equals its per-expert loop twin bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Qwen3OmniMoeTextConfig
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

from omnistream.engine.model_executor.layers.grouped_gemm import (
    fits_grouped_mm,
    grouped_gemm,
    grouped_gemm_loop,
)
from omnistream.engine.model_executor.layers.moe import (
    SparseMoeBlock,
    expert_checkpoint_shards,
)


def hf_block(num_experts: int, top_k: int, dtype: torch.dtype, hidden: int = 64, width: int = 48,
             norm_topk_prob: bool = True, seed: int = 0) -> hf.Qwen3OmniMoeThinkerTextSparseMoeBlock:
    """transformers' own sparse MoE block (eager expert loop) with random O(1)-activation weights."""
    config = Qwen3OmniMoeTextConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=num_experts,
                                    num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = hf.Qwen3OmniMoeThinkerTextSparseMoeBlock(config)
    for param in block.parameters():
        param.data.normal_(0, 0.2)
    return block.to(dtype)


def ours_from(reference: hf.Qwen3OmniMoeThinkerTextSparseMoeBlock) -> SparseMoeBlock:
    """Our block with the reference's weights, loaded through the checkpoint loaders (HF-5.x fused layout)."""
    experts = reference.experts
    ours = SparseMoeBlock(experts.hidden_dim, experts.intermediate_dim, experts.num_experts,
                          reference.gate.top_k, reference.gate.norm_topk_prob).to(experts.gate_up_proj.dtype)
    ours.gate.weight.data.copy_(reference.gate.weight)
    for suffix, tensor in (("gate_up_proj", experts.gate_up_proj), ("down_proj", experts.down_proj)):
        for name, shard, shard_id in expert_checkpoint_shards(suffix, tensor.data):
            param = getattr(ours, name)
            param.weight_loader(param, shard, shard_id)
    return ours


def assert_equals_hf(reference: hf.Qwen3OmniMoeThinkerTextSparseMoeBlock, x: torch.Tensor) -> None:
    with torch.no_grad():
        got, want = ours_from(reference)(x), reference(x[None])[0]
    assert got.dtype == want.dtype
    assert torch.equal(got, want), f"max |diff| = {(got.float() - want.float()).abs().max().item():.3e}"


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (8, 8), (16, 2), (16, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_equals_the_hf_expert_loop_bit_for_bit(dtype, num_experts, top_k, num_tokens):
    reference = hf_block(num_experts, top_k, dtype, seed=num_tokens)
    assert_equals_hf(reference, torch.randn(num_tokens, 64).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_without_renormalised_weights_equals_the_hf_loop(dtype):
    reference = hf_block(16, 8, dtype, norm_topk_prob=False)
    assert_equals_hf(reference, torch.randn(33, 64).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_experts_that_receive_no_tokens_change_nothing(dtype):
    reference = hf_block(16, 4, dtype)
    reference.gate.weight.data[1::2] = -1.0  # odd experts: logits far below the others for positive inputs
    x = torch.rand(20, 64).to(dtype) + 0.5
    _, experts = ours_from(reference).route(x)
    assert (experts % 2 == 0).all()
    assert_equals_hf(reference, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_empty_batch_gives_an_empty_output(dtype):
    assert_equals_hf(hf_block(8, 2, dtype), torch.randn(0, 64).to(dtype))


def expert_offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_grouped_gemm_uses_grouped_mm_and_equals_its_loop_twin(dtype):
    x, w = torch.randn(40, 64).to(dtype), torch.randn(6, 96, 64).to(dtype)
    offs = expert_offsets([0, 9, 0, 17, 14, 0])  # empty groups first, inside and last
    assert fits_grouped_mm(x, w, offs)
    assert torch.equal(grouped_gemm(x, w, offs), grouped_gemm_loop(x, w, offs))


def test_grouped_gemm_falls_back_to_the_loop_where_strides_do_not_allow_grouped_mm():
    x, w = torch.randn(10, 60).to(torch.bfloat16), torch.randn(3, 20, 60).to(torch.bfloat16)
    offs = expert_offsets([4, 0, 6])
    assert not fits_grouped_mm(x, w, offs)  # 60 bf16 = 120 bytes: not a multiple of 16
    with pytest.raises(RuntimeError, match="16 bytes"):
        torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    assert torch.equal(grouped_gemm(x, w, offs), grouped_gemm_loop(x, w, offs))


def operand_layouts(dtype: torch.dtype) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """x [10, K] and w [3, N, K] in contiguous, transposed and sliced storage, aligned or not."""
    layouts = []
    for k in (60, 64):
        xs = {"x": torch.randn(10, k), "x.T-stored": torch.randn(k, 10).t(),
              "x-sliced": torch.randn(10, 70)[:, :k]}
        ws = {"w": torch.randn(3, 12, k), "w.T-stored": torch.randn(3, k, 12).transpose(1, 2),
              "w-sliced": torch.randn(3, 12, 70)[..., :k]}
        layouts += [(f"{xn},{wn},K={k}", x.to(dtype), w.to(dtype))
                    for xn, x in xs.items() for wn, w in ws.items()]
    return layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fits_grouped_mm_agrees_with_grouped_mm_own_checks(dtype):
    offs = expert_offsets([4, 0, 6])
    verdicts = set()
    for name, x, w in operand_layouts(dtype):
        try:
            torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            accepted = True
        except RuntimeError:
            accepted = False
        assert fits_grouped_mm(x, w, offs) == accepted, name
        got = grouped_gemm(x, w, offs)
        assert got.is_contiguous() and torch.equal(got, grouped_gemm_loop(x, w, offs)), name
        verdicts.add(accepted)
    assert verdicts == {True, False}


def test_grouped_mm_is_refused_for_int64_offsets_mixed_dtypes_and_non_matrices():
    x, w, offs = torch.randn(10, 64), torch.randn(3, 8, 64), expert_offsets([4, 0, 6])
    assert fits_grouped_mm(x, w, offs)
    assert not fits_grouped_mm(x, w, offs.long())
    assert not fits_grouped_mm(x, w.to(torch.bfloat16), offs)
    assert not fits_grouped_mm(x.double(), w.double(), offs)
    assert not fits_grouped_mm(x[None], w, offs)


class HostTensorTripwire(TorchDispatchMode):
    """Fails on any op producing a tensor off the `meta` device: a host-built tensor inside the forward."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                raise AssertionError(f"{func} made a {leaf.device} tensor {tuple(leaf.shape)}")
        return out


def test_tripwire_catches_a_host_built_tensor():
    with pytest.raises(AssertionError, match="cpu tensor"), HostTensorTripwire():
        torch.zeros(3, device="meta") + torch.tensor([1.0, 2.0, 3.0]).to("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_runs_on_meta_without_a_host_tensor(dtype):
    with torch.device("meta"):
        block = SparseMoeBlock(64, 48, 16, 8, True).to(dtype)
        x = torch.empty(37, 64, dtype=dtype)
    with torch.no_grad(), HostTensorTripwire():
        out = block(x)
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == dtype


def test_block_compiles_to_one_graph_in_fp32_that_a_new_token_count_does_not_recompile():
    reference = hf_block(8, 2, torch.float32)
    ours = ours_from(reference)
    compiled = torch.compile(ours, fullgraph=True, backend="eager", dynamic=True)
    with torch.no_grad():
        x = torch.randn(7, 64)
        assert torch.equal(compiled(x), ours(x))
        x = torch.randn(19, 64)
        with torch.compiler.set_stance("fail_on_recompile"):
            got = compiled(x)
        assert torch.equal(got, ours(x))


def test_moe_loader_rejects_bad_shapes_and_parts():
    block = SparseMoeBlock(16, 8, 4, 2, True)
    with pytest.raises(ValueError, match="does not fit"):
        block.weight_loader(block.w13, torch.zeros(8, 17), (0, "gate"))
    with pytest.raises(ValueError, match="out of range"):
        block.weight_loader(block.w13, torch.zeros(8, 16), (4, "up"))
    assert expert_checkpoint_shards("0.mystery.weight", torch.zeros(1)) == []
