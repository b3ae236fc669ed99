"""Sparse MoE block: replicated fp32-softmax top-k router and fused SiLU-GLU experts sharded on the expert width.

Experts live in `w13 [E, 2*I/tp, H]` (gate rows, then up rows) and `w2 [E, H, I/tp]`; one all-reduce per block.
The forward never reads the routing on the host: rows are sorted by expert on the device and each projection
is one grouped GEMM. Each token's k weighted outputs are then added into zeros of the hidden dtype in ascending
expert id, the order of HF's eager per-expert loop, so the result equals it bit for bit on CPU (fp32, bf16).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.engine.model_executor.distributed import (
    get_tp_rank,
    get_tp_world_size,
    tensor_model_parallel_all_reduce,
)
from omnistream.engine.model_executor.layers.grouped_gemm import grouped_gemm
from omnistream.engine.model_executor.layers.linear import (
    ReplicatedLinear,
    check_shape,
    divide,
)

_PER_EXPERT = re.compile(r"(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def expert_checkpoint_shards(suffix: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor, tuple[int, str]]]:
    """Map a checkpoint tensor named `experts.<suffix>` to (param name, tensor, (expert, part)) for the loaders.

    Accepts per-expert tensors (`3.gate_proj.weight`, `3.up_proj.weight`, `3.down_proj.weight`) and the HF-5.x
    fused ones (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`). Any other suffix maps to nothing ([]).
    """
    match = _PER_EXPERT.fullmatch(suffix)
    if match:
        expert, proj = int(match.group(1)), match.group(2)
        part = proj.removesuffix("_proj")
        return [("w2" if part == "down" else "w13", tensor, (expert, part))]
    if suffix == "gate_up_proj":
        gate, up = tensor.chunk(2, dim=1)
        return [("w13", g, (e, "gate")) for e, g in enumerate(gate)] + [
            ("w13", u, (e, "up")) for e, u in enumerate(up)
        ]
    if suffix == "down_proj":
        return [("w2", d, (e, "down")) for e, d in enumerate(tensor)]
    return []


class SparseMoeBlock(nn.Module):
    """y = sum over the top-k experts of weight_e * down_e(silu(gate_e(x)) * up_e(x)); no shared expert."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, norm_topk_prob: bool
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.local_width = divide(intermediate_size, self.tp_size, "moe_intermediate_size")
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.local_width, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_width), requires_grad=False)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader
        self.register_buffer("expert_ids", torch.arange(num_experts), persistent=False)
        experts = range(num_experts)
        self.w13.shard_ids = tuple((e, part) for e in experts for part in ("gate", "up"))
        self.w2.shard_ids = tuple((e, "down") for e in experts)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: tuple[int, str]) -> None:
        """Copy this rank's slice of one expert's gate [I, H], up [I, H] or down [H, I] matrix."""
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} out of range (num_experts={self.num_experts})")
        width, start = self.local_width, self.tp_rank * self.local_width
        if part == "down":
            target, shard = param.data[expert], loaded_weight.narrow(1, start, width)
        elif part in ("gate", "up"):
            offset = 0 if part == "gate" else width
            target, shard = param.data[expert].narrow(0, offset, width), loaded_weight.narrow(0, start, width)
        else:
            raise ValueError(f"expert part must be 'gate', 'up' or 'down', got {part!r}")
        check_shape(target, shard)
        target.copy_(shard)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k weights (model dtype) and expert ids, each [T, k]: softmax in fp32, then top-k, then renormalise."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H] with no host sync: group sizes stay on the device as a grouped GEMM's offsets."""
        weights, experts = self.route(x)
        num_tokens, top_k = experts.shape
        # HF's eager loop adds each token's expert outputs one index_add_ per expert, in ascending expert id;
        # the same k adds in the same order give the same bits (one summed reduction rounds differently).
        experts, slots = experts.sort(dim=-1)
        weights = weights.gather(-1, slots)
        flat_experts = experts.reshape(-1)
        # grouped by expert, tokens ascending within a group
        sorted_experts, order = flat_experts.sort(stable=True)
        # expert e's group ends where the sorted ids pass e (not bincount, which sizes its output from the data)
        offs = torch.searchsorted(sorted_experts, self.expert_ids, right=True, out_int32=True)
        gate, up = grouped_gemm(x.index_select(0, order // top_k), self.w13, offs).chunk(2, dim=-1)
        # silu(gate) * up written into the gate half (rows strided by 2I, which the grouped GEMM reads as they are)
        y = grouped_gemm(F.silu(gate, inplace=True).mul_(up), self.w2, offs)
        y.mul_(weights.reshape(-1).index_select(0, order).unsqueeze(-1))
        y = torch.empty_like(y).index_copy_(0, order, y).view(num_tokens, top_k, x.shape[-1])  # token-major
        out = torch.zeros_like(x)
        for slot in range(top_k):
            out.add_(y[:, slot])
        return tensor_model_parallel_all_reduce(out)
