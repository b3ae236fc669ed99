"""Streaming code2wav for many voices at once: one forward per step for every voice's new frames, each voice
keeping its own exact streaming state (as `Code2WavStream`) in a row of a pool sized for the most voices.

The transformer runs all voices together (each at its own frame, with its own ring). The ConvNet runs twice at
most: once for voices at their first frame (no left context: 1365 samples at the real rates) and once for the
rest (1920 per frame), so every voice gets exactly the samples its own stream would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from omnistream.engine.model_executor.layers.causal_conv import ConvState
from omnistream.engine.model_executor.models.code2wav import Code2Wav
from omnistream.engine.model_executor.models.code2wav_convnet import run_convnet
from omnistream.engine.model_executor.models.code2wav_transformer import TransformerRing


class VoiceSamples(NamedTuple):
    """The new final samples of a push: `samples` [total] (float, in [-1, 1]) and each voice's [start, stop)
    in it, in the order the voices were pushed."""

    samples: torch.Tensor
    spans: list[tuple[int, int]]


def _rows(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """A slice when the rows are consecutive (views, written in place), else an index tensor."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)


class Code2WavVoices:
    """Up to `capacity` voices, named by the caller; `push` advances some of them by the same number of frames
    and `drop` frees a voice's row (its next push starts a new stream)."""

    def __init__(self, model: Code2Wav, capacity: int) -> None:
        weight = model.code_embedding.weight
        self.model, self.capacity, self.device = model, capacity, weight.device
        self.ring = TransformerRing(model.config, capacity, weight.dtype, weight.device)
        # per causal layer [capacity, C, context]: a voice's left buffers, read from its second frame on
        self.tails: dict[nn.Module, torch.Tensor] = {}
        self.row_of: dict[str, int] = {}
        self.num_frames = [0] * capacity

    def __contains__(self, voice: str) -> bool:
        return voice in self.row_of

    def __len__(self) -> int:
        return len(self.row_of)

    def drop(self, voice: str) -> None:
        row = self.row_of.pop(voice, None)
        if row is None:
            return
        self.num_frames[row] = 0
        self.ring.clear(row)  # the left buffers need no clearing: a voice's first frame writes all of them

    def warm_up(self) -> None:
        """Decode a first and a second frame for every number of voices up to the capacity, then forget them:
        the first call of each convolution shape is slow (the backend builds its kernels), so this moves that cost
        from the first steps that speak to start-up."""
        quantizers = self.model.config.num_quantizers
        for size in range(1, self.capacity + 1):
            voices = [f"warm-up-{i}" for i in range(size)]
            codes = torch.zeros(size, quantizers, 1, dtype=torch.long, device=self.device)
            self.push(voices, codes)
            self.push(voices, codes)
            for voice in voices:
                self.drop(voice)

    def _row(self, voice: str) -> int:
        row = self.row_of.get(voice)
        if row is None:
            taken = set(self.row_of.values())
            free = [r for r in range(self.capacity) if r not in taken]
            if not free:
                raise ValueError(f"code2wav holds {self.capacity} voices already; drop one before adding {voice!r}")
            row = self.row_of[voice] = free[0]
        return row

    @torch.no_grad()
    def push(self, voices: list[str], codes: torch.Tensor) -> VoiceSamples:
        """codes [B, Q, n]: the next n frames of each of the B (distinct) voices -> their new final samples."""
        quantizers = self.model.config.num_quantizers
        if codes.dim() != 3 or codes.shape[0] != len(voices) or codes.shape[1] != quantizers or not codes.shape[2]:
            raise ValueError(f"codes must be [{len(voices)}, {quantizers}, frames >= 1], got {tuple(codes.shape)}")
        rows = [self._row(voice) for voice in voices]
        index = _rows(rows, self.device)
        first = torch.tensor([self.num_frames[r] for r in rows], dtype=torch.long, device=self.device)
        ring = self.ring.take(index)
        hidden = self.model.pre_transformer(self.model.embed(codes), first, ring).transpose(1, 2)
        if isinstance(index, torch.Tensor):
            self.ring.put(index, ring)
        fresh = [i for i, r in enumerate(rows) if self.num_frames[r] == 0]
        going = [i for i, r in enumerate(rows) if self.num_frames[r] > 0]
        pieces, lengths = [], [0] * len(rows)
        for group in (fresh, going):
            if not group:
                continue
            wav = self._convnet([rows[i] for i in group], hidden[group], fresh=group is fresh)
            pieces.append(wav.reshape(-1))
            for i in group:
                lengths[i] = wav.shape[-1]
        for r in rows:
            self.num_frames[r] += codes.shape[2]
        return VoiceSamples(torch.cat(pieces), _spans(fresh + going, lengths))

    def _convnet(self, rows: list[int], hidden: torch.Tensor, fresh: bool) -> torch.Tensor:
        """The ConvNet over these voices' transformer frames [b, H, n], from and back to their left buffers."""
        index = _rows(rows, self.device)
        state = ConvState()
        if not fresh:
            state.tails = {layer: tails[index] for layer, tails in self.tails.items()}
        wav = run_convnet(self.model.upsample, self.model.decoder, hidden, state)
        for layer, tail in state.tails.items():
            pool = self.tails.get(layer)
            if pool is None:
                pool = self.tails[layer] = tail.new_zeros(self.capacity, *tail.shape[1:])
            pool[index] = tail
        return wav


def _spans(order: list[int], lengths: list[int]) -> list[tuple[int, int]]:
    """Each voice's [start, stop) in samples laid out group by group (`order`: voice indices in that layout)."""
    spans, start = [(0, 0)] * len(lengths), 0
    for i in order:
        spans[i] = (start, start + lengths[i])
        start += lengths[i]
    return spans
