"""The AuT audio encoder of the Qwen3-Omni thinker: log-mel frames [128, T] → audio token embeddings [N_tok, out_dim].

Owns the conv stem, the windowed bidirectional transformer and the output head; it does not compute log-mel features.
Windows never interact, so a clip is encoded in bounded groups of whole windows (never a T×T attention matrix).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.engine.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

MAX_WINDOW_CHUNKS = 8  # the checkpoint's n_window_infer (800 frames) is the largest attention window we accept
_ATTN_WINDOWS_PER_CALL = 64  # bounds the attention scores held at once (windows × heads × W × W)


@dataclass(frozen=True)
class AudioEncoderConfig:
    """The `audio_config` fields the encoder uses (doc §1.3): shapes are required, the rest default as in CKPT."""

    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    downsample_hidden_size: int
    output_dim: int
    num_mel_bins: int = 128
    n_window: int = 50
    n_window_infer: int = 800
    conv_chunksize: int = 500

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AudioEncoderConfig:
        required = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                    "downsample_hidden_size", "output_dim")
        missing = [k for k in required if raw.get(k) is None]
        if missing:
            raise ValueError(f"audio_config: missing required fields {missing}")
        act = raw.get("activation_function", "gelu")
        if act != "gelu":
            raise ValueError(f"audio_config: unsupported activation_function {act!r} (only exact 'gelu')")
        if raw.get("scale_embedding"):
            raise ValueError("audio_config: scale_embedding=true is not supported (the checkpoint uses false)")
        optional = ("num_mel_bins", "n_window", "n_window_infer", "conv_chunksize")
        config = cls(**{k: int(raw[k]) for k in required}, **{k: int(raw[k]) for k in optional if k in raw})
        if config.d_model % config.encoder_attention_heads:
            raise ValueError(f"audio_config: d_model {config.d_model} is not divisible by "
                             f"encoder_attention_heads {config.encoder_attention_heads}")
        return config

    @property
    def chunk_frames(self) -> int:
        """Mel frames per conv chunk (100 = 1 s)."""
        return 2 * self.n_window

    @property
    def tokens_per_chunk(self) -> int:
        return audio_output_length(self.chunk_frames, self.n_window)


def audio_output_length(num_frames: int, n_window: int = 50) -> int:
    """Audio tokens for a clip of `num_frames` mel frames (doc §3.7): 13·⌊T/100⌋ + ⌈(T mod 100)/8⌉."""
    chunk = 2 * n_window
    feat = (num_frames % chunk - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (num_frames // chunk) * 13


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper-style positions [length, channels]: sin of the first half, cos of the second, float32."""
    half = channels // 2
    inv_timescales = torch.exp(-(math.log(max_timescale) / (half - 1)) * torch.arange(half, dtype=torch.float32))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[tuple[int, int]],
                       scale: float) -> torch.Tensor:
    """Bidirectional attention inside each (start, length) segment of q/k/v [N, heads, head_dim] → [N, heads, hd].

    Segments of equal length run as one batched call; segments must tile [0, N) in order.
    """
    out = torch.empty_like(q)
    by_length: dict[int, list[int]] = defaultdict(list)
    for start, length in segments:
        by_length[length].append(start)
    for length, starts in by_length.items():
        for i in range(0, len(starts), _ATTN_WINDOWS_PER_CALL):
            group = starts[i : i + _ATTN_WINDOWS_PER_CALL]
            first = group[0]
            if all(s == first + j * length for j, s in enumerate(group)):  # contiguous: a free view
                index = None
                qs, ks, vs = (t[first : first + len(group) * length].unflatten(0, (len(group), length))
                              for t in (q, k, v))
            else:
                index = (torch.tensor(group, device=q.device)[:, None]
                         + torch.arange(length, device=q.device)).flatten()
                qs, ks, vs = (t[index].unflatten(0, (len(group), length)) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2),
                                               scale=scale).transpose(1, 2).flatten(0, 1)
            if index is None:
                out[first : first + len(group) * length] = o
            else:
                out[index] = o
    return out


class AudioAttention(nn.Module):
    """Whisper-style attention with biases, heads split across TP ranks; windows come as segments."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        heads = config.encoder_attention_heads
        self.head_dim = config.d_model // heads
        self.qkv_proj = QKVParallelLinear(config.d_model, self.head_dim, heads, heads, bias=True)
        self.num_heads = self.qkv_proj.num_heads
        self.out_proj = RowParallelLinear(config.d_model, config.d_model, bias=True)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim))
                   for t in self.qkv_proj(x).split(self.qkv_proj.split_sizes, dim=-1))
        return self.out_proj(segment_attention(q, k, v, segments, self.scale).flatten(1))


class AudioEncoderLayer(nn.Module):
    """Pre-LN block: windowed self-attention, then fc1 → exact GELU → fc2."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.self_attn = AudioAttention(config)
        self.final_layer_norm = nn.LayerNorm(config.d_model)
        self.fc1 = ColumnParallelLinear(config.d_model, config.encoder_ffn_dim, bias=True)
        self.fc2 = RowParallelLinear(config.encoder_ffn_dim, config.d_model, bias=True)

    def forward(self, x: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), segments)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            bound = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-bound, bound)
        return x


class AudioEncoder(nn.Module):
    """AuT: 100-frame chunks → conv stem (+ per-chunk sinusoids) → windowed layers → ln_post → proj1/GELU/proj2.

    Parameter names follow the checkpoint's `audio_tower.*` (q/k/v are packed into `self_attn.qkv_proj`).
    """

    def __init__(self, audio_config: dict[str, Any] | AudioEncoderConfig) -> None:
        super().__init__()
        config = audio_config if isinstance(audio_config, AudioEncoderConfig) else AudioEncoderConfig.from_dict(
            audio_config)
        self.config = config
        ch, d = config.downsample_hidden_size, config.d_model
        self.conv2d1 = nn.Conv2d(1, ch, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(ch, ch, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(ch, ch, 3, 2, padding=1)
        freq = config.num_mel_bins
        for _ in range(3):
            freq = (freq - 1) // 2 + 1
        self.conv_out = ReplicatedLinear(ch * freq, d, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(config) for _ in range(config.encoder_layers))
        self.ln_post = nn.LayerNorm(d)
        self.proj1 = ReplicatedLinear(d, d, bias=True)
        self.proj2 = ReplicatedLinear(d, config.output_dim, bias=True)
        self.register_buffer("positions", sinusoid_table(config.tokens_per_chunk, d), persistent=False)
        self.requires_grad_(False)

    @property
    def default_window_frames(self) -> int:
        return self.config.n_window_infer

    def check_window_frames(self, window_frames: int | None) -> int:
        """The attention window in mel frames: a multiple of the chunk (100) from 1 to 8 chunks."""
        chunk = self.config.chunk_frames
        window_frames = self.default_window_frames if window_frames is None else int(window_frames)
        if window_frames % chunk or not chunk <= window_frames <= MAX_WINDOW_CHUNKS * chunk:
            raise ValueError(f"window_frames must be a multiple of {chunk} between {chunk} and "
                             f"{MAX_WINDOW_CHUNKS * chunk} mel frames, got {window_frames}")
        return window_frames

    def forward(self, features: torch.Tensor | list[torch.Tensor], window_frames: int | None = None,
                part_of_longer_clip: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Encode one clip [num_mel_bins, T] → [N_tok, output_dim], or a list of clips → a list of outputs.

        Attention is bidirectional inside windows of `window_frames` mel frames (default n_window_infer),
        each window covering window_frames/100 chunks of 13 tokens; the last window of a clip holds the rest.
        `part_of_longer_clip`: the frames are whole windows cut from a clip of at least one chunk, so a short
        last chunk is zero-padded as in that clip's offline encoding (even when these frames are < 1 chunk).
        """
        if isinstance(features, torch.Tensor):
            return self.forward([features], window_frames, part_of_longer_clip)[0]
        return self._encode([(clip, 0, clip.shape[1]) for clip in features], self.check_window_frames(window_frames),
                            part_of_longer_clip)

    def encode_range(self, features: torch.Tensor, start: int, end: int,
                     window_frames: int | None = None) -> torch.Tensor:
        """Rows of the offline encoding of `features[:, :end]` for frames [start, end); `start` must open a window.

        Windows never interact, so this equals `forward(features[:, :end])[token(start):token(end)]` with
        token(f) = audio_output_length(f). Used to encode a stream window by window.
        """
        window_frames = self.check_window_frames(window_frames)
        if start % window_frames or not 0 <= start <= end <= features.shape[1]:
            raise ValueError(f"frame range [{start}, {end}) must start on a {window_frames}-frame window boundary "
                             f"and lie within the {features.shape[1]} frames given")
        return self._encode([(features, start, end)], window_frames)[0]

    def _encode(self, ranges: list[tuple[torch.Tensor, int, int]], window_frames: int,
                part_of_longer_clip: bool = False) -> list[torch.Tensor]:
        """Encode frames [start, end) of each clip (start on a window boundary), in bounded groups of windows."""
        for clip, _, _ in ranges:
            if clip.dim() != 2 or clip.shape[0] != self.config.num_mel_bins:
                raise ValueError(f"audio features must be [{self.config.num_mel_bins}, T], got {tuple(clip.shape)}")
        # (range index, window frames, whether its chunks are zero-padded to a full chunk)
        windows = [(i, clip[:, s : min(s + window_frames, end)], part_of_longer_clip or end >= self.config.chunk_frames)
                   for i, (clip, start, end) in enumerate(ranges) for s in range(start, end, window_frames)]
        outputs: list[list[torch.Tensor]] = [[] for _ in ranges]
        windows_per_group = max(1, self.config.conv_chunksize * self.config.chunk_frames // window_frames)
        for g in range(0, len(windows), windows_per_group):
            group = windows[g : g + windows_per_group]
            rows = self._encode_windows([(w, padded) for _, w, padded in group])
            lengths = [audio_output_length(w.shape[1], self.config.n_window) for _, w, _ in group]
            for (i, _, _), part in zip(group, rows.split(lengths)):
                outputs[i].append(part)
        empty = self.positions.new_empty(0, self.config.output_dim)
        return [torch.cat(parts) if parts else empty for parts in outputs]

    def _encode_windows(self, windows: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
        """Each (frames [mel, ≤ window_frames], padded) is one attention window; returns their tokens concatenated.

        A chunk shorter than 100 frames is zero-padded to 100 (the padding reaches its last kept step through the
        conv receptive field, as in HF), except in a clip shorter than one chunk, which HF does not pad either.
        """
        chunk = self.config.chunk_frames
        dtype = self.conv2d1.weight.dtype
        full = [F.pad(w.to(dtype), (0, -w.shape[1] % chunk)).unflatten(1, (-1, chunk)).transpose(0, 1)
                for w, padded in windows if padded]
        stems = iter(self._conv_stem(torch.cat(full)).split([c.shape[0] for c in full])) if full else iter(())
        pieces, segments, offset = [], [], 0
        for w, padded in windows:
            length = audio_output_length(w.shape[1], self.config.n_window)
            # keep ceil(c/8) steps of every chunk: all 13 of a full chunk, fewer in the window's short last chunk
            pieces.append(next(stems).flatten(0, 1)[:length] if padded else self._conv_stem(w.to(dtype)[None])[0])
            segments.append((offset, length))
            offset += length
        x = torch.cat(pieces)
        for layer in self.layers:
            x = layer(x, segments)
        return self.proj2(F.gelu(self.proj1(self.ln_post(x))))

    def _conv_stem(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks [n, mel, frames] → [n, steps, d_model] with the per-chunk sinusoidal positions added."""
        x = F.gelu(self.conv2d1(chunks.unsqueeze(1)))
        x = F.gelu(self.conv2d2(x))
        x = F.gelu(self.conv2d3(x))  # [n, channels, freq', steps]
        x = self.conv_out(x.permute(0, 3, 1, 2).flatten(2))  # feature index = channel * freq' + freq
        return x + self.positions[: x.shape[1]].to(x.dtype)
