"""RMSNorm exactly as HF Qwen3: normalise in float32, cast back to the input dtype, then scale by the weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _inverse_rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def normalize_(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x divided by its root mean square over the last dim (computed in float32), written into x (any strides)."""
    x32 = x.float()
    scale = _inverse_rms(x32, eps)
    if x32 is x:
        return x.mul_(scale)
    return x.copy_(x32.mul_(scale))  # the copy rounds as .to(x.dtype) does


class RMSNorm(nn.Module):
    """Normalises over the last dim, so it serves both hidden states and per-head q/k."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * _inverse_rms(x32, self.eps)).to(x.dtype)
        if normed.dtype != self.weight.dtype:  # the weight's dtype decides the result's, as in HF
            return self.weight * normed
        return normed.mul_(self.weight)  # a fresh tensor: scaled in place (weight * n == n * weight bit for bit)

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """forward written into x itself (any strides; x and the weight of one dtype), the same bits."""
        return normalize_(x, self.eps).mul_(self.weight)


def rms_norm_heads_(x: torch.Tensor, norms: Sequence[RMSNorm], heads: Sequence[int]) -> torch.Tensor:
    """Per-head RMSNorm of x [T, sum(heads), D] in place, the first heads[0] heads by norms[0], and so on: one
    normalising pass over all heads (the norms must share eps), then each group scaled by its weight. The same
    bits as each norm's forward on its own heads; fewer ops (q and k of an attention layer in one go)."""
    if len({norm.eps for norm in norms}) != 1:
        raise ValueError(f"norms normalised together must share eps, got {[norm.eps for norm in norms]}")
    normalize_(x, norms[0].eps)
    for group, norm in zip(x.split(list(heads), dim=-2), norms):
        group.mul_(norm.weight)
    return x
