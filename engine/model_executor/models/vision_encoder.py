"""The Qwen3-Omni thinker's ViT (Qwen3-VL style): patch rows [N, 1536] + grid_thw → tokens and DeepStack levels.

Owns patch embedding, interpolated absolute positions, 2-D RoPE, the blocks and the mergers; it does no image
preprocessing. Rows arrive in spatial-merge-block order (4 consecutive rows = one 2×2 block), as the processor emits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.engine.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    copy_weight,
)
from omnistream.engine.model_executor.layers.rotary import rotate_half
from omnistream.engine.model_executor.models.audio_encoder import segment_attention

Grid = Sequence[tuple[int, int, int]]
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class VisionEncoderConfig:
    """The `vision_config` fields the ViT uses (doc §1.4); shape fields are required, the rest default as in CKPT."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    deepstack_visual_indexes: tuple[int, ...] = field(default=())
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionEncoderConfig:
        required = ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size")
        missing = [k for k in required if raw.get(k) is None]
        if missing:
            raise ValueError(f"vision_config: missing required fields {missing}")
        optional = ("in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
                    "num_position_embeddings")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision_config: unsupported rope_type {rope['rope_type']!r} (only 'axial')")
        config = cls(
            **{k: int(raw[k]) for k in required},
            **{k: int(raw[k]) for k in optional if k in raw},
            deepstack_visual_indexes=tuple(int(i) for i in raw.get("deepstack_visual_indexes") or ()),
            hidden_act=raw.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision_config: unsupported hidden_act {config.hidden_act!r}")
        if config.hidden_size % config.num_heads or (config.hidden_size // config.num_heads) % 4:
            raise ValueError("vision_config: head_dim (hidden_size / num_heads) must be a multiple of 4 for 2-D RoPE")
        if int(config.num_position_embeddings**0.5) ** 2 != config.num_position_embeddings:
            raise ValueError("vision_config: num_position_embeddings must be a square grid")
        if any(not 0 <= i < config.depth for i in config.deepstack_visual_indexes):
            raise ValueError(f"vision_config: deepstack_visual_indexes {config.deepstack_visual_indexes} "
                             f"must lie in 0..depth-1 ({config.depth - 1})")
        return config

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row: C · T · P · P (1536)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def merge_block_coords(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch of an h×w grid in spatial-merge-block order: blocks raster, raster inside a block."""
    rows = torch.arange(h).view(h // merge, 1, merge, 1).expand(h // merge, w // merge, merge, merge)
    cols = torch.arange(w).view(1, w // merge, 1, merge).expand(h // merge, w // merge, merge, merge)
    return rows.flatten(), cols.flatten()


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners=True) taps [n, 2] into a `side`-long table, and their float32 weights."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = src.floor()
    frac = src - floor
    taps = torch.stack([floor.long(), (floor.long() + 1).clamp(max=side - 1)], dim=1)
    return taps, torch.stack([1 - frac, frac], dim=1)


class PatchEmbed(ReplicatedLinear):
    """The Conv3d patch projection as the equivalent Linear over the flattened (C, T, P, P) row."""

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if param is self.weight:  # checkpoint: [hidden, C, T, P, P]
            loaded_weight = loaded_weight.reshape(loaded_weight.shape[0], -1)
        copy_weight(param, loaded_weight, shard_id)


class VisionAttention(nn.Module):
    """Packed q|k|v (heads split across TP ranks), 2-D RoPE in float32, attention per temporal slice."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_heads, config.num_heads, bias=True)
        self.num_heads = self.qkv.num_heads
        self.proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[tuple[int, int]]) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim))
                   for t in self.qkv(x).split(self.qkv.split_sizes, dim=-1))
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        return self.proj(segment_attention(q, k, v, segments, self.scale).flatten(1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.linear_fc1 = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)
        self.approximate = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[tuple[int, int]]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2×2 merge → Linear → exact GELU → Linear, with LayerNorm per patch (main merger) or over the merged
    4·hidden vector (DeepStack mergers)."""

    def __init__(self, config: VisionEncoderConfig, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged_size = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.ln_q = nn.LayerNorm(self.merged_size if postshuffle_norm else config.hidden_size, eps=1e-6)
        self.mlp = nn.ModuleList([
            ColumnParallelLinear(self.merged_size, self.merged_size, bias=True),
            nn.GELU(),
            RowParallelLinear(self.merged_size, config.out_hidden_size, bias=True),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle_norm:
            x = self.ln_q(x.view(-1, self.merged_size))
        else:
            x = self.ln_q(x).view(-1, self.merged_size)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionEncoder(nn.Module):
    """Images and videos alike: (pixel rows, grid_thw) → (tokens [N/4, out], DeepStack [levels, N/4, out]).

    Parameter names follow the checkpoint's `visual.*`.
    """

    def __init__(self, vision_config: dict[str, Any] | VisionEncoderConfig) -> None:
        super().__init__()
        config = vision_config if isinstance(vision_config, VisionEncoderConfig) else VisionEncoderConfig.from_dict(
            vision_config)
        self.config = config
        self.patch_embed = nn.Module()
        self.patch_embed.proj = PatchEmbed(config.patch_dim, config.hidden_size, bias=True)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.grid_side = int(config.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.merger_list = nn.ModuleList(
            PatchMerger(config, postshuffle_norm=True) for _ in config.deepstack_visual_indexes)
        rope_dim = config.hidden_size // config.num_heads // 2  # half the head for rows, half for columns
        exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim
        self.register_buffer("inv_freq", 1.0 / config.rope_theta**exponents, persistent=False)
        self.requires_grad_(False)

    @property
    def num_deepstack_levels(self) -> int:
        return len(self.config.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: Grid | torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values [Σ t·h·w, 1536] in merge-block order; grid_thw one (t, h, w) per image or video."""
        grids = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
        self._check_inputs(pixel_values, grids)
        rows, cols, pos_index, pos_weight = self._patch_coords(grids, pixel_values.device)
        x = self.patch_embed.proj(pixel_values.to(self.pos_embed.weight.dtype))
        x = x + (self.pos_embed(pos_index) * pos_weight.unsqueeze(-1)).sum(1).to(x.dtype)
        theta = torch.cat([rows[:, None].float() * self.inv_freq, cols[:, None].float() * self.inv_freq], dim=-1)
        emb = torch.cat([theta, theta], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        segments, offset = [], 0
        for t, h, w in grids:  # one attention segment per temporal slice: no cross-frame or cross-image attention
            for _ in range(t):
                segments.append((offset, h * w))
                offset += h * w
        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            if index in self.config.deepstack_visual_indexes:
                deepstack.append(self.merger_list[self.config.deepstack_visual_indexes.index(index)](x))
        embeds = self.merger(x)
        stacked = torch.stack(deepstack) if deepstack else embeds.new_empty(0, *embeds.shape)
        return embeds, stacked

    def _check_inputs(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> None:
        merge = self.config.spatial_merge_size
        if pixel_values.dim() != 2 or pixel_values.shape[1] != self.config.patch_dim:
            raise ValueError(f"pixel_values must be [N, {self.config.patch_dim}], got {tuple(pixel_values.shape)}")
        for t, h, w in grids:
            if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
                raise ValueError(f"grid (t, h, w) = {(t, h, w)} must be positive with h, w multiples of {merge}")
        total = sum(t * h * w for t, h, w in grids)
        if total != pixel_values.shape[0]:
            raise ValueError(f"grid_thw covers {total} patches but pixel_values has {pixel_values.shape[0]} rows")

    def _patch_coords(self, grids: list[tuple[int, int, int]], device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per patch: row, col, the 4 bilinear pos-embed indices and weights; each frame repeats its image's."""
        rows, cols, indices, weights = [], [], [], []
        side = self.grid_side
        for t, h, w in grids:
            r, c = merge_block_coords(h, w, self.config.spatial_merge_size)
            r_taps, r_w = _axis_taps(r, h, side)
            c_taps, c_w = _axis_taps(c, w, side)
            index = (r_taps[:, :, None] * side + c_taps[:, None, :]).flatten(1)
            weight = (r_w[:, :, None] * c_w[:, None, :]).flatten(1)
            for values, out in ((r, rows), (c, cols), (index, indices), (weight, weights)):
                out.append(values.repeat(t, *([1] * (values.dim() - 1))))
        return tuple(torch.cat(v).to(device) for v in (rows, cols, indices, weights))  # type: ignore[return-value]
