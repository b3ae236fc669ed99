"""The dense SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), weights whole on every rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.engine.model_executor.layers.linear import ReplicatedLinear


class GatedMLP(nn.Module):
    """Checkpoint names `gate_proj`, `up_proj`, `down_proj`, no biases (the speech models' MLPs and shared
    expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = ReplicatedLinear(hidden_size, intermediate_size, bias=False)
        self.up_proj = ReplicatedLinear(hidden_size, intermediate_size, bias=False)
        self.down_proj = ReplicatedLinear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))
