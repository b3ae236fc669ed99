"""Streaming code2wav for one voice, exact: each pushed frame yields the samples that no later frame can
change.

`Code2WavStream` (the fast form) carries the model's state: the transformer's 72-frame K/V ring and the
ConvNet's left buffers, at the cost of one frame per frame. `ReferenceCode2WavStream` is its slow twin for
tests: the same ring, but the ConvNet rerun from zeros over the last `REFERENCE_CONTEXT_FRAMES` transformer
frames plus the new one (the new samples' receptive field) at 11× the work. Both give 1365 samples for the
first frame, then 1920 per frame, and in total what `Code2Wav.forward` gives on the whole sequence.
"""

from __future__ import annotations

import torch

from omnistream.engine.model_executor.layers.causal_conv import ConvState
from omnistream.engine.model_executor.models.code2wav import Code2Wav, Code2WavState
from omnistream.engine.model_executor.models.code2wav_convnet import run_convnet

REFERENCE_CONTEXT_FRAMES = 10  # the ConvNet's receptive field in frames before the new one (9 is not enough)


def _check_codes(model: Code2Wav, codes: torch.Tensor) -> torch.Tensor:
    quantizers = model.config.num_quantizers
    if codes.dim() != 2 or codes.shape[0] != quantizers or codes.shape[1] == 0:
        raise ValueError(f"codes must be [{quantizers}, frames >= 1], got {tuple(codes.shape)}")
    return codes.unsqueeze(0)


class Code2WavStream:
    """One voice: `push(codes [Q, n])` returns its new final samples [k] (float, in [-1, 1])."""

    def __init__(self, model: Code2Wav) -> None:
        self.model = model
        self.state = Code2WavState(model)

    @property
    def num_frames(self) -> int:
        return self.state.num_frames

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(_check_codes(self.model, codes), self.state).reshape(-1)


class ReferenceCode2WavStream:
    """The slow twin of `Code2WavStream`: stateful transformer, stateless ConvNet over a window of frames."""

    def __init__(self, model: Code2Wav) -> None:
        self.model = model
        self.state = Code2WavState(model)
        self.recent: torch.Tensor | None = None  # transformer frames [1, H, <= context + 1]

    @torch.no_grad()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        codes = _check_codes(self.model, codes)
        pieces = []
        for t in range(codes.shape[-1]):
            first = self.state.num_frames == 0
            hidden = self.model.transform(codes[..., t : t + 1], self.state)
            window = hidden if self.recent is None else torch.cat((self.recent, hidden), dim=-1)
            self.recent = window[..., -(REFERENCE_CONTEXT_FRAMES + 1) :]
            wav = run_convnet(self.model.upsample, self.model.decoder, self.recent, ConvState()).reshape(-1)
            pieces.append(wav if first else wav[-self.model.config.samples_per_frame :])
        return torch.cat(pieces)
