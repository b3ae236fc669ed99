"""Code2wav: 16-codebook frames (12.5 Hz) to a 24 kHz waveform. Checkpoint prefix `code2wav.`.

e_t = mean_q E[c_{q,t} + q·codebook_size]; the sliding-window transformer; the ConvNet. `decode` advances a
voice's `Code2WavState` by a chunk of frames and returns the samples that became final; `forward` is the same
path from a fresh state over a whole sequence (n frames → n·1920 − 555 samples at the real rates).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from omnistream.engine.checkpoint.speech_config import Code2WavConfig
from omnistream.engine.model_executor.layers.causal_conv import ConvState
from omnistream.engine.model_executor.layers.embedding import VocabParallelEmbedding
from omnistream.engine.model_executor.models.code2wav_convnet import (
    build_decoder,
    build_upsample,
    run_convnet,
)
from omnistream.engine.model_executor.models.code2wav_transformer import (
    Code2WavTransformer,
    TransformerRing,
)
from omnistream.engine.model_executor.models.weight_routing import load_named_weights


class Code2WavState:
    """Everything one voice carries between chunks: the transformer's K/V ring, the ConvNet's left buffers and
    the number of frames decoded so far (the next frame's position)."""

    def __init__(self, model: Code2Wav, batch: int = 1) -> None:
        weight = model.code_embedding.weight
        self.ring = TransformerRing(model.config, batch, weight.dtype, weight.device)
        self.conv = ConvState()
        self.num_frames = 0

    def num_values(self) -> int:
        """Values held for this voice (ring plus buffers): what a voice slot costs."""
        return self.ring.num_values() + self.conv.num_values()


class Code2Wav(nn.Module):
    """Code embedding, pre-transformer, upsamplers and decoder, named as the checkpoint."""

    def __init__(self, config: Code2WavConfig) -> None:
        super().__init__()
        self.config = config
        self.code_embedding = VocabParallelEmbedding(config.codebook_size * config.num_quantizers, config.hidden_size)
        self.pre_transformer = Code2WavTransformer(config)
        self.upsample = build_upsample(config.hidden_size, config.upsampling_ratios)
        self.decoder = build_decoder(config.hidden_size, config.decoder_dim, config.upsample_rates)
        self.requires_grad_(False)
        offsets = torch.arange(config.num_quantizers) * config.codebook_size
        self.register_buffer("code_offset", offsets.view(1, -1, 1), persistent=False)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q, n] -> frame embeddings [B, n, H] (the mean over the Q codebooks)."""
        if codes.dim() != 3 or codes.shape[1] != self.config.num_quantizers:
            raise ValueError(f"codes must be [batch, {self.config.num_quantizers}, frames], got {tuple(codes.shape)}")
        return self.code_embedding(codes + self.code_offset).mean(1)

    def transform(self, codes: torch.Tensor, state: Code2WavState) -> torch.Tensor:
        """The transformer's output [B, H, n] for the next n frames of `state`'s voice (advances its ring)."""
        first = torch.full((codes.shape[0],), state.num_frames, dtype=torch.long, device=codes.device)
        hidden = self.pre_transformer(self.embed(codes), first, state.ring)
        state.num_frames += codes.shape[-1]
        return hidden.transpose(1, 2)

    def decode(self, codes: torch.Tensor, state: Code2WavState) -> torch.Tensor:
        """The samples [B, 1, k] that the next frames (codes [B, Q, n]) make final: after frame t, samples up
        to (t+1)·1920 − 555; the rest need the next frame's look-ahead."""
        return run_convnet(self.upsample, self.decoder, self.transform(codes, state), state.conv)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Whole-sequence decode, codes [B, Q, n] -> waveform [B, 1, num_samples(n)] in [-1, 1] (HF's
        `forward`)."""
        return self.decode(codes, Code2WavState(self, codes.shape[0]))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load names relative to `code2wav.`; return the parameters that were loaded."""
        return load_named_weights(self, weights, "code2wav")
