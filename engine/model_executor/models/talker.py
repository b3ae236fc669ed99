"""The talker: an MoE decoder (shared expert, q/k RMSNorm, interleaved M-RoPE) over the paged KV cache that
predicts codebook 0 of each audio frame, with its input projections and the code predictor it feeds.

Checkpoint prefix `talker.`. It maps input rows (built by `talker_prompt`) to final-normed hidden states and
codec logits. Tensor parallelism is not implemented: the speech lane runs whole on rank 0 in v1 (built at TP
size 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.engine.checkpoint.model_config import TextConfig
from omnistream.engine.checkpoint.speech_config import TalkerConfig
from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.layers.embedding import VocabParallelEmbedding
from omnistream.engine.model_executor.layers.linear import ReplicatedLinear
from omnistream.engine.model_executor.layers.norm import RMSNorm
from omnistream.engine.model_executor.layers.rotary import MRotaryEmbedding
from omnistream.engine.model_executor.layers.shared_expert_moe import SharedExpertMoeBlock
from omnistream.engine.model_executor.models.code_predictor import CodePredictor
from omnistream.engine.model_executor.models.qwen3_omni_thinker import MoeDecoderLayer
from omnistream.engine.model_executor.models.weight_routing import load_named_weights


class ProjectionMLP(nn.Module):
    """Thinker width → talker width: linear_fc2(silu(linear_fc1(x))), both with bias."""

    def __init__(self, in_size: int, hidden_size: int, out_size: int) -> None:
        super().__init__()
        self.linear_fc1 = ReplicatedLinear(in_size, hidden_size, bias=True)
        self.linear_fc2 = ReplicatedLinear(hidden_size, out_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


def _shared_expert_moe(text: TextConfig, shared_width: int) -> SharedExpertMoeBlock:
    return SharedExpertMoeBlock(
        text.hidden_size,
        text.moe_intermediate_size,
        text.num_experts,
        text.num_experts_per_tok,
        text.norm_topk_prob,
        shared_width,
    )


class TalkerModel(nn.Module):
    """Codec embedding, decoder layers and final norm (checkpoint prefix `talker.model.`)."""

    def __init__(self, config: TalkerConfig, attention_backend: str) -> None:
        super().__init__()
        text = config.text
        self.codec_embedding = VocabParallelEmbedding(text.vocab_size, text.hidden_size)
        self.rotary_emb = MRotaryEmbedding(text.head_dim, text.rope_theta, text.mrope_section)
        self.layers = nn.ModuleList(
            MoeDecoderLayer(text, attention_backend, _shared_expert_moe(text, config.shared_expert_intermediate_size))
            for _ in range(text.num_hidden_layers)
        )
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} KV caches (one per layer), got {len(kv_caches)}")
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(hidden, cos, sin, kv_cache, attn_metadata)
        return self.norm(hidden)


class Talker(nn.Module):
    """Decoder + codec_head (untied) + text/hidden projections + code predictor, named as the checkpoint."""

    def __init__(self, config: TalkerConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        text = config.text
        self.model = TalkerModel(config, attention_backend)
        self.codec_head = ReplicatedLinear(text.hidden_size, text.vocab_size, bias=False)
        self.text_projection = ProjectionMLP(
            config.thinker_hidden_size, config.projection_size, text.hidden_size
        )
        self.hidden_projection = ProjectionMLP(
            config.thinker_hidden_size, config.projection_size, text.hidden_size
        )
        self.code_predictor = CodePredictor(config.code_predictor)
        attn = self.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def kv_cache_shape_per_layer(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """[2 (k, v), num_blocks, block_size, KV heads, head_dim]."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the talker's codec table (codebook 0 entries and the special codec ids)."""
        return self.model.codec_embedding(ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Final-normed hidden states [T, H] of a flat batch of input rows at M-RoPE positions [3, T] (or
        [T]); a row's state is also the code predictor's input for the frame sampled there."""
        return self.model(inputs_embeds, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Codec logits [N, vocab] in float32 (the projection runs in the model dtype, like HF)."""
        return self.codec_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load names relative to `talker.`; return the parameters whose every shard was loaded."""
        return load_named_weights(self, weights, "talker")
