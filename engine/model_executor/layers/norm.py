"""RMSNorm exactly as HF Qwen3: normalise in float32, cast back to the input dtype, then scale by the weight."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalises over the last dim, so it serves both hidden states and per-head q/k."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def _scale(self, x32: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * self._scale(x32)).to(x.dtype)
        if normed.dtype != self.weight.dtype:  # the weight's dtype decides the result's, as in HF
            return self.weight * normed
        return normed.mul_(self.weight)  # a fresh tensor: scaled in place (weight * n == n * weight bit for bit)

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """forward written into x itself (any strides; x and the weight of one dtype), the same bits."""
        x32 = x.float()
        scale = self._scale(x32)
        if x32 is x:
            x.mul_(scale)
        else:
            x.copy_(x32.mul_(scale))  # the copy rounds as .to(x.dtype) does
        return x.mul_(self.weight)
