"""The code predictor: per frame, codebooks 1..G-1 from the talker's hidden state and codebook 0 (G-1 steps).

Checkpoint prefix `talker.code_predictor.`. Each frame starts from an empty K/V buffer of G positions: [z,
E_talker(c0)] at positions 0 and 1, then E_cp[g-2](c_{g-1}) at position g. `predict` runs the whole loop with
shapes fixed by G and the batch size alone (a static buffer and a mask, never a growing cache), so it can be
captured as one graph per batch size; the last code is embedded for the next talker input but never fed
back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from omnistream.engine.checkpoint.speech_config import CodePredictorConfig
from omnistream.engine.model_executor.layers.dense_attention import DenseSelfAttention
from omnistream.engine.model_executor.layers.embedding import VocabParallelEmbedding
from omnistream.engine.model_executor.layers.linear import ReplicatedLinear
from omnistream.engine.model_executor.layers.mlp import GatedMLP
from omnistream.engine.model_executor.layers.norm import RMSNorm
from omnistream.engine.model_executor.layers.rotary import RotaryEmbedding

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] float32 -> ids [B]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class CodePrediction(NamedTuple):
    codes: torch.Tensor  # [B, G-1]: codebooks 1..G-1
    residual_embeds: torch.Tensor  # [B, H]: Σ_g E_cp[g-1](c_g), the frame's share of the next talker input
    logits: torch.Tensor  # [B, G-1, V] float32, step by step


class CodePredictorLayer(nn.Module):
    """Pre-norm block: attention over the frame's buffer, then a dense SwiGLU MLP."""

    def __init__(self, config: CodePredictorConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DenseSelfAttention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.attention_bias,
            qk_norm_eps=config.rms_norm_eps,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        buffer: tuple[torch.Tensor, torch.Tensor],
        start: int,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, n, H] at positions start..start+n-1; writes their K/V into `buffer` ([B, G, kv_heads, d]
        each)."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        keys, values = buffer
        keys[:, start : start + x.shape[1]] = k
        values[:, start : start + x.shape[1]] = v
        x = x + self.self_attn.attend(q, keys, values, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class CodePredictorModel(nn.Module):
    """The G-1 codebook embeddings, the decoder layers and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: CodePredictorConfig) -> None:
        super().__init__()
        groups = config.num_code_groups - 1
        self.codec_embedding = nn.ModuleList(
            VocabParallelEmbedding(config.vocab_size, config.hidden_size) for _ in range(groups)
        )
        self.layers = nn.ModuleList(CodePredictorLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        buffers: list[tuple[torch.Tensor, torch.Tensor]],
        start: int,
        visible: torch.Tensor,
    ) -> torch.Tensor:
        for layer, buffer in zip(self.layers, buffers):
            x = layer(x, cos, sin, buffer, start, visible)
        return self.norm(x)


class CodePredictor(nn.Module):
    """The model and one output head per residual codebook (`lm_head.{0..G-2}`, untied)."""

    def __init__(self, config: CodePredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.model = CodePredictorModel(config)
        self.lm_head = nn.ModuleList(
            ReplicatedLinear(config.hidden_size, config.vocab_size, bias=False)
            for _ in range(config.num_code_groups - 1)
        )

    def predict(
        self, hidden: torch.Tensor, c0_embeds: torch.Tensor, sample: Sampler = greedy
    ) -> CodePrediction:
        """Codebooks 1..G-1 for a batch of frames from the talker's final-normed hidden state [B, H] at the
        position that sampled c0 and c0's talker embedding [B, H]; `sample` picks each step's ids from its
        logits."""
        config, batch = self.config, hidden.shape[0]
        positions = config.num_code_groups
        buffers = [
            (
                hidden.new_zeros(batch, positions, config.num_key_value_heads, config.head_dim),
                hidden.new_zeros(batch, positions, config.num_key_value_heads, config.head_dim),
            )
            for _ in self.model.layers
        ]
        cos, sin = self.model.rotary_emb(torch.arange(positions, device=hidden.device), hidden.dtype)
        causal = torch.ones(positions, positions, dtype=torch.bool, device=hidden.device).tril()
        x, start = torch.stack((hidden, c0_embeds), dim=1), 0
        codes, logits, residual = [], [], torch.zeros_like(hidden)
        for step, head in enumerate(self.lm_head):
            end = start + x.shape[1]
            out = self.model(x, cos[start:end], sin[start:end], buffers, start, causal[start:end])
            step_logits = head(out[:, -1]).float()
            ids = sample(step_logits)
            row = self.model.codec_embedding[step](ids)
            residual = residual + row
            codes.append(ids)
            logits.append(step_logits)
            x, start = row.unsqueeze(1), end
        return CodePrediction(torch.stack(codes, dim=1), residual, torch.stack(logits, dim=1))
