"""The talker's MoE block: the routed experts of SparseMoeBlock plus a shared expert behind a sigmoid gate.

Built whole on one rank (the speech lane runs on rank 0 in v1), so the parent's all-reduce is a no-op there.
"""

from __future__ import annotations

import torch

from omnistream.engine.model_executor.layers.linear import ReplicatedLinear
from omnistream.engine.model_executor.layers.mlp import GatedMLP
from omnistream.engine.model_executor.layers.moe import SparseMoeBlock


class SharedExpertMoeBlock(SparseMoeBlock):
    """y = Σ_topk w_e·expert_e(x) + sigmoid(x·g)·shared_expert(x), added in that order as HF does."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        shared_intermediate_size: int,
    ) -> None:
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, norm_topk_prob)
        self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared
