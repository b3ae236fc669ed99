"""Code2wav's pre-transformer: causal sliding-window attention (window W frames), LayerScale, 1-D RoPE.

It runs on a `TransformerRing` per voice: each layer's rotated K/V of the last W frames in slots frame % W, so
a chunk of any length attends to exactly the keys a whole-sequence forward would give it (frames t-W+1..t) and
the state never grows. A fresh ring is the start of a sequence.
Checkpoint prefix `code2wav.pre_transformer.`.
"""

from __future__ import annotations

import copy

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
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # [B, W]: the frame each slot of each voice holds
        self.frames = torch.full((batch, config.sliding_window), _EMPTY, dtype=torch.long, device=device)
        self.window = config.sliding_window

    def num_values(self) -> int:
        return sum(t.numel() for t in self.keys + self.values)

    def clear(self, row: int) -> None:
        """Forget voice `row`'s frames: its slots then hold nothing a query can see (a fresh stream)."""
        self.frames[row] = _EMPTY

    def take(self, rows: slice | torch.Tensor) -> TransformerRing:
        """The ring of some voices: views of these rows for a slice, a copy for an index tensor (then `put`
        writes it back)."""
        part = copy.copy(self)
        part.keys = [keys[rows] for keys in self.keys]
        part.values = [values[rows] for values in self.values]
        part.frames = self.frames[rows]
        return part

    def put(self, rows: torch.Tensor, part: TransformerRing) -> None:
        """Write back a ring that `take` copied for these rows."""
        for mine, theirs in zip(self.keys + self.values + [self.frames], part.keys + part.values + [part.frames]):
            mine.index_copy_(0, rows, theirs)


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
        """x [B, n, H], cos/sin [B, n, d]; cache: this layer's ring keys/values [B, W, kv_heads, d]; the last
        k new frames of each voice are written there at slots [B, k]."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        ring_keys, ring_values = cache
        attn = self.self_attn.attend(q, torch.cat((ring_keys, k), dim=1), torch.cat((ring_values, v), dim=1), visible)
        voices, kept = torch.arange(x.shape[0], device=x.device).unsqueeze(1), slots.shape[1]
        ring_keys[voices, slots] = k[:, k.shape[1] - kept :]
        ring_values[voices, slots] = v[:, v.shape[1] - kept :]
        x = x + self.self_attn_layer_scale(attn)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Code2WavTransformer(nn.Module):
    """Layers and final RMSNorm over 12.5 Hz frame embeddings."""

    def __init__(self, config: Code2WavConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Code2WavTransformerLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, x: torch.Tensor, first_frames: torch.Tensor, ring: TransformerRing) -> torch.Tensor:
        """Each voice b's frames first_frames[b].. +n-1 (x [B, n, H]) after everything `ring` has seen for it
        -> [B, n, H]; voices may be at different frames."""
        frames = first_frames.unsqueeze(1) + torch.arange(x.shape[1], device=x.device)  # [B, n]
        cos, sin = self.rotary_emb(frames, x.dtype)
        keys = torch.cat((ring.frames, frames), dim=1)
        age = frames.unsqueeze(2) - keys.unsqueeze(1)  # [B, n, W + n]: query frame minus key frame
        visible = (age >= 0) & (age < ring.window)
        kept = frames[:, -ring.window :]
        slots = kept % ring.window
        for layer, cache in zip(self.layers, zip(ring.keys, ring.values)):
            x = layer(x, cos, sin, cache, visible, slots)
        ring.frames.scatter_(1, slots, kept)
        return self.norm(x)
