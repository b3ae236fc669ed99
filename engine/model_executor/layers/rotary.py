"""Rotary position embeddings: interleaved M-RoPE (Qwen3-Omni), where each frequency index is driven by the T, H
or W position row, and plain 1-D RoPE (the code predictor and code2wav).

Frequency j uses row H if j % 3 == 1 and j < 3*section[1], row W if j % 3 == 2 and j < 3*section[2], else T.
cos/sin are computed in float32 and cast to the activation dtype; rotation is NeoX style (rotate_half).
"""

from __future__ import annotations

import torch
from torch import nn


def mrope_rows(mrope_section: tuple[int, int, int]) -> torch.Tensor:
    """For every frequency index, which position row (0=T, 1=H, 2=W) drives it."""
    num_freqs = sum(mrope_section)
    j = torch.arange(num_freqs)
    rows = torch.zeros(num_freqs, dtype=torch.long)
    rows[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    rows[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return rows


class MRotaryEmbedding(nn.Module):
    """Turns positions [3, T] (or [T] for plain text) into cos, sin of shape [T, head_dim]."""

    def __init__(self, head_dim: int, rope_theta: float, mrope_section: tuple[int, int, int]) -> None:
        super().__init__()
        if sum(mrope_section) * 2 != head_dim:
            raise ValueError(f"sum(mrope_section)={sum(mrope_section)} must equal head_dim/2={head_dim / 2}")
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / (rope_theta**exponents), persistent=False)
        self.register_buffer("rows", mrope_rows(mrope_section), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            positions = positions.expand(3, -1)
        if positions.dim() != 2 or positions.shape[0] != 3:
            raise ValueError(f"positions must have shape [3, T] or [T], got {tuple(positions.shape)}")
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [3, T, F]
        index = self.rows.view(1, 1, -1).expand(1, freqs.shape[1], -1)
        theta = freqs.gather(0, index).squeeze(0)  # [T, F]
        emb = torch.cat((theta, theta), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class RotaryEmbedding(nn.Module):
    """Plain RoPE: positions [T] into cos, sin of shape [T, head_dim] (float32 angles, cast to `dtype`)."""

    def __init__(self, head_dim: int, rope_theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self.register_buffer("inv_freq", 1.0 / (rope_theta**exponents), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        theta = positions.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((theta, theta), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, heads, head_dim] by cos/sin [T, head_dim]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary written into x [T, heads, head_dim] itself (any strides), bit for bit the same values.

    cos/sin repeat their first half (both come from cat(theta, theta)), so with x = (a, b) halves the result is
    (a*cos - b*sin, b*cos + a*sin): the same products and sums as x*cos + rotate_half(x)*sin, since
    a + (-b)*s == a - b*s exactly. Two half-width temporaries instead of five full-width ones.
    """
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(-2), sin[..., :half].unsqueeze(-2)
    first, second = x[..., :half], x[..., half:]
    first_sin, second_sin = first * sin, second * sin
    first.mul_(cos).sub_(second_sin)
    second.mul_(cos).add_(first_sin)
    return x
