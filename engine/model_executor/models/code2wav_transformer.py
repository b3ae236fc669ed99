"""Code2wav's pre-transformer: causal sliding-window attention (window W frames), LayerScale, 1-D RoPE.

It runs on a `TransformerRing` per voice: each layer's rotated K/V of the last W frames in slots frame % W, so
a chunk of any length attends to exactly the keys a whole-sequence forward would give it (frames t-W+1..t) and
the state never grows. A fresh ring is the start of a sequence.
Checkpoint prefix `code2wav.pre_transformer.`.
"""

from __future__ import annotations

import torch
from torch import nn

from omnistream.engine.checkpoint.speech_config import Code2WavConfig
from omnistream.engine.model_executor.layers.dense_attention import DenseSelfAttention
from omnistream.engine.model_executor.layers.mlp import GatedMLP
from omnistream.engine.model_executor.layers.norm import RMSNorm
from omnistream.engine.model_executor.layers.rotary import RotaryEmbedding

_EMPTY = -(2**40)  # frame id of a slot never written: outside every query's window


class TransformerRing:
    """One voice's K/V of the last `window` frames for every layer, and which frame each slot holds."""

    def __init__(self, config: Code2WavConfig, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, config.sliding_window, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.frames = torch.full((config.sliding_window,), _EMPTY, dtype=torch.long, device=device)
        self.window = config.sliding_window

    def num_values(self) -> int:
        return sum(t.numel() for t in self.keys + self.values)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (checkpoint name `scale`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Code2WavTransformerLayer(nn.Module):
    """x += λa ⊙ Attn(RMSNorm(x)); x += λm ⊙ SwiGLU(RMSNorm(x)); attention has no q/k norm."""

    def __init__(self, config: Code2WavConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DenseSelfAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.attention_bias,
            qk_norm_eps=None,
        )
        self.self_attn_layer_scale = LayerScale(config.hidden_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.mlp_layer_scale = LayerScale(config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        visible: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, n, H]; cache: this layer's ring keys/values; the last len(slots) new frames are written
        there."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        ring_keys, ring_values = cache
        attn = self.self_attn.attend(
            q, torch.cat((ring_keys, k), dim=1), torch.cat((ring_values, v), dim=1), visible
        )
        ring_keys.index_copy_(1, slots, k[:, k.shape[1] - len(slots) :])
        ring_values.index_copy_(1, slots, v[:, v.shape[1] - len(slots) :])
        x = x + self.self_attn_layer_scale(attn)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Code2WavTransformer(nn.Module):
    """Layers and final RMSNorm over 12.5 Hz frame embeddings."""

    def __init__(self, config: Code2WavConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Code2WavTransformerLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, x: torch.Tensor, first_frame: int, ring: TransformerRing) -> torch.Tensor:
        """Frames first_frame..first_frame+n-1 (x [B, n, H]) after everything `ring` has seen -> [B, n, H]."""
        frames = torch.arange(first_frame, first_frame + x.shape[1], device=x.device)
        cos, sin = self.rotary_emb(frames, x.dtype)
        keys = torch.cat((ring.frames, frames))
        age = frames.unsqueeze(1) - keys.unsqueeze(0)  # query frame minus key frame
        visible = (age >= 0) & (age < ring.window)
        kept = frames[-ring.window :]
        slots = kept % ring.window
        for layer, cache in zip(self.layers, zip(ring.keys, ring.values)):
            x = layer(x, cos, sin, cache, visible, slots)
        ring.frames.index_copy_(0, slots, kept)
        return self.norm(x)
