"""Causal 1-D convolutions that stream: each keeps, in a `ConvState`, the left context its next chunk needs.

A fresh state stands for zero left padding, so decoding a whole sequence and decoding it chunk by chunk
through one state run the same code and give the same samples. Layouts are [B, C, T]; checkpoint names end in
`conv.weight`.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvState:
    """One voice's left buffers: for each layer, the trailing inputs it has seen (absent before its first
    chunk)."""

    def __init__(self) -> None:
        self.tails: dict[nn.Module, torch.Tensor] = {}

    def num_values(self) -> int:
        """How many values the buffers hold (per voice; the cost of a voice slot)."""
        return sum(t.numel() for t in self.tails.values())


class CausalConv1d(nn.Module):
    """Stride-1 convolution over inputs t-(k-1)·d..t: keeps its last (k-1)·d inputs (zeros at the start)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.context = (kernel_size - 1) * dilation

    def forward(self, x: torch.Tensor, state: ConvState) -> torch.Tensor:
        if self.context:
            tail = state.tails.get(self)
            if tail is None:
                tail = x.new_zeros(x.shape[0], x.shape[1], self.context)
            x = torch.cat((tail, x), dim=-1)
            state.tails[self] = x[..., -self.context :].clone()  # not a view that pins the chunk
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """Transposed convolution (k = s or k = 2s) cropped by k−s samples at each end, as HF's causal one.

    With k = 2s, output j needs inputs ⌊j/s⌋ and ⌊j/s⌋+1, so a chunk of n inputs finalises n·s outputs once
    the layer keeps its last input; its first chunk gives (n−1)·s. With k = s it needs nothing from before."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        if kernel_size not in (stride, 2 * stride):
            raise ValueError(
                f"a causal transposed conv needs kernel {stride} or {2 * stride}, got {kernel_size}"
            )
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.crop = kernel_size - stride
        self.keeps_last = kernel_size == 2 * stride

    def forward(self, x: torch.Tensor, state: ConvState) -> torch.Tensor:
        if self.keeps_last:
            tail = state.tails.get(self)
            state.tails[self] = x[..., -1:].clone()
            if tail is not None:
                x = torch.cat((tail, x), dim=-1)
        y = self.conv(x)
        return y[..., self.crop : y.shape[-1] - self.crop]
