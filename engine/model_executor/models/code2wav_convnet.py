"""Code2wav's convolutional half: the ×2 upsamplers with ConvNeXt blocks, then the causal decoder with Snake.

Every layer takes the voice's `ConvState`, so one code path decodes a whole sequence (fresh state) or streams
it chunk by chunk with the same samples. Names follow the checkpoint
(`upsample.i.{0,1}`, `decoder.{0..6}`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.engine.model_executor.layers.causal_conv import (
    CausalConv1d,
    CausalConvTranspose1d,
    ConvState,
)
from omnistream.engine.model_executor.layers.snake import SnakeBeta


class ConvNeXtBlock(nn.Module):
    """x + γ ⊙ pwconv2(GELU(pwconv1(LayerNorm(causal depthwise conv k7 (x)))))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, state: ConvState) -> torch.Tensor:
        h = self.norm(self.dwconv(x, state).transpose(1, 2))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.transpose(1, 2)


class ResidualUnit(nn.Module):
    """x + conv_k1(Snake(causal conv k7, dilation d (Snake(x))))."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: ConvState) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), state)), state)


class DecoderBlock(nn.Module):
    """Snake, causal ConvT(k=2r, s=r) halving the channels, then residual units with dilations 1, 3, 9."""

    def __init__(self, in_dim: int, out_dim: int, rate: int) -> None:
        super().__init__()
        units = [ResidualUnit(out_dim, dilation) for dilation in (1, 3, 9)]
        self.block = nn.ModuleList([SnakeBeta(in_dim), CausalConvTranspose1d(in_dim, out_dim, 2 * rate, rate), *units])

    def forward(self, x: torch.Tensor, state: ConvState) -> torch.Tensor:
        x = self.block[1](self.block[0](x), state)
        for unit in self.block[2:]:
            x = unit(x, state)
        return x


def build_upsample(hidden_size: int, ratios: tuple[int, ...]) -> nn.ModuleList:
    """`upsample.i` = [causal ConvT(k=s=ratio), ConvNeXt block] per ratio (no look-ahead)."""
    return nn.ModuleList(
        nn.ModuleList([CausalConvTranspose1d(hidden_size, hidden_size, ratio, ratio), ConvNeXtBlock(hidden_size)])
        for ratio in ratios
    )


def build_decoder(hidden_size: int, decoder_dim: int, rates: tuple[int, ...]) -> nn.ModuleList:
    """`decoder` = [conv k7 to decoder_dim, a block per rate (channels halve), Snake, conv k7 to 1 out]."""
    blocks = [DecoderBlock(decoder_dim // 2**i, decoder_dim // 2 ** (i + 1), rate) for i, rate in enumerate(rates)]
    out_dim = decoder_dim // 2 ** len(rates)
    return nn.ModuleList(
        [CausalConv1d(hidden_size, decoder_dim, 7), *blocks, SnakeBeta(out_dim), CausalConv1d(out_dim, 1, 7)]
    )


def run_convnet(
    upsample: nn.ModuleList, decoder: nn.ModuleList, hidden: torch.Tensor, state: ConvState
) -> torch.Tensor:
    """Transformer output [B, H, n] (12.5 Hz) -> waveform [B, 1, samples] clamped to [-1, 1]."""
    for conv_t, block in upsample:
        hidden = block(conv_t(hidden, state), state)
    hidden = decoder[0](hidden, state)
    for block in decoder[1:-2]:
        hidden = block(hidden, state)
    return decoder[-1](decoder[-2](hidden), state).clamp(-1.0, 1.0)
