"""SnakeBeta, the vocoder's periodic activation: x + sin²(x·e^α) / (e^β + 1e-9), α, β per channel (logs)."""

from __future__ import annotations

import torch
from torch import nn


class SnakeBeta(nn.Module):
    """Acts on [B, C, T]; `alpha` and `beta` [C] are stored as logarithms, as in the checkpoint."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.beta = nn.Parameter(torch.zeros(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp().view(1, -1, 1)
        inverse_beta = 1.0 / (self.beta.exp().view(1, -1, 1) + 1e-9)
        # in place on the one new tensor: the same products and sum, without two temporaries of x's size
        return torch.sin(x * alpha).square_().mul_(inverse_beta).add_(x)
