"""The Qwen3-Omni thinker: text decoder (Qwen3-MoE, interleaved M-RoPE, DeepStack) over a flat batch and paged KV
cache, plus its audio and vision encoders. It maps token ids or merged embeddings to hidden states and logits, and
media to embeddings; merging embeddings into placeholder positions, scheduling and sampling belong to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from omnistream.engine.checkpoint.model_config import TextConfig, ThinkerConfig
from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.attention.selector import get_attention_backend
from omnistream.engine.model_executor.layers.embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from omnistream.engine.model_executor.layers.linear import (
    QKVParallelLinear,
    RowParallelLinear,
)
from omnistream.engine.model_executor.layers.moe import SparseMoeBlock
from omnistream.engine.model_executor.layers.norm import RMSNorm, rms_norm_heads_
from omnistream.engine.model_executor.layers.rotary import (
    MRotaryEmbedding,
    apply_rotary_,
)
from omnistream.engine.model_executor.models.audio_encoder import AudioEncoder
from omnistream.engine.model_executor.models.vision_encoder import VisionEncoder
from omnistream.engine.model_executor.models.weight_routing import load_named_weights


class ThinkerAttention(nn.Module):
    """GQA with per-head q/k RMSNorm before M-RoPE; K/V go through the backend into the paged cache (one backend
    call per layer and step, whatever the mix of prefill chunks and decodes)."""

    def __init__(self, text: TextConfig, attention_backend: str) -> None:
        super().__init__()
        self.head_dim = text.head_dim
        self.qkv_proj = QKVParallelLinear(
            text.hidden_size, text.head_dim, text.num_attention_heads, text.num_key_value_heads, text.attention_bias
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        q_size, kv_size, _ = self.qkv_proj.split_sizes
        self.qk_and_v_sizes = [q_size + kv_size, kv_size]
        self.o_proj = RowParallelLinear(text.num_attention_heads * text.head_dim, text.hidden_size, text.attention_bias)
        self.q_norm = RMSNorm(text.head_dim, text.rms_norm_eps)
        self.k_norm = RMSNorm(text.head_dim, text.rms_norm_eps)
        weight = self.qkv_proj.weight
        self.backend = get_attention_backend(
            attention_backend, weight.device, weight.dtype, self.num_heads, self.num_kv_heads, self.head_dim
        )
        self.scale = text.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens, heads = x.shape[0], [self.num_heads, self.num_kv_heads]
        qk, v = self.qkv_proj(x).split(self.qk_and_v_sizes, dim=-1)
        # q and k heads are normalised and rotated together, in place in the projection's output (views of it)
        qk = qk.view(num_tokens, sum(heads), self.head_dim)
        apply_rotary_(rms_norm_heads_(qk, (self.q_norm, self.k_norm), heads), cos, sin)
        q, k = qk.split(heads, dim=1)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        o = self.backend.forward(q, k, v, kv_cache, attn_metadata, self.scale)
        return self.o_proj(o.reshape(num_tokens, self.num_heads * self.head_dim))


class MoeDecoderLayer(nn.Module):
    """Pre-norm residual block: the thinker's attention, then an MoE block (the thinker's sparse one; the
    talker passes its shared-expert one)."""

    def __init__(self, text: TextConfig, attention_backend: str, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.self_attn = ThinkerAttention(text, attention_backend)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.mlp = mlp or SparseMoeBlock(
            text.hidden_size,
            text.moe_intermediate_size,
            text.num_experts,
            text.num_experts_per_tok,
            text.norm_topk_prob,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, attn_metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class ThinkerTextModel(nn.Module):
    """Embedding, decoder layers and final norm (checkpoint prefix `model.`)."""

    def __init__(self, text: TextConfig, attention_backend: str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size)
        self.rotary_emb = MRotaryEmbedding(text.head_dim, text.rope_theta, text.mrope_section)
        self.layers = nn.ModuleList(MoeDecoderLayer(text, attention_backend) for _ in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
        deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} KV caches (one per layer), got {len(kv_caches)}")
        num_levels = 0 if deepstack_embeds is None else deepstack_embeds.shape[0]
        if deepstack_embeds is not None and (
            deepstack_embeds.dim() != 3 or deepstack_embeds.shape[1:] != hidden.shape or num_levels > len(self.layers)
        ):
            raise ValueError(
                f"deepstack_embeds must be [levels <= {len(self.layers)}, {hidden.shape[0]}, {hidden.shape[1]}], "
                f"got {tuple(deepstack_embeds.shape)}"
            )
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            hidden = layer(hidden, cos, sin, kv_cache, attn_metadata)
            if index < num_levels:  # DeepStack: rows are zero except at image/video placeholder positions
                hidden = hidden + deepstack_embeds[index].to(hidden.dtype)
        return self.norm(hidden)


class Qwen3OmniThinkerForCausalLM(nn.Module):
    """Thinker text decoder + untied lm_head + audio_tower / visual encoders (each built when its config is given).

    Parameter names follow the thinker-only checkpoint. `attention_backend` names the attention backend
    (attention/selector.py), resolved for the device and dtype the model is built on.
    """

    def __init__(self, config: ThinkerConfig, attention_backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        text = config.text
        self.model = ThinkerTextModel(text, attention_backend)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size)
        self.audio_tower = AudioEncoder(config.audio_config) if config.audio_config else None
        self.visual = VisionEncoder(config.vision_config) if config.vision_config else None
        attn = self.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim

    @property
    def attention_backend(self) -> str:
        """The name of the attention backend the layers run."""
        return self.model.layers[0].self_attn.backend.name

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def kv_cache_shape_per_layer(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """[2 (k, v), num_blocks, block_size, KV heads on this rank, head_dim]."""
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H]; multimodal features are merged into these by the caller."""
        return self.model.embed_tokens(input_ids)

    def embed_audio(self, features: list[torch.Tensor], window_frames: int | None = None,
                    part_of_longer_clip: bool = False) -> list[torch.Tensor]:
        """Audio token embeddings [N_i, H] per clip of log-mel frames [128, T_i] (attention window in mel frames);
        `part_of_longer_clip`: the frames are windows cut from a longer clip (see AudioEncoder.forward)."""
        if self.audio_tower is None:
            raise ValueError("this checkpoint has no audio encoder (config.json lacks audio_config)")
        return [e.to(self.lm_head.weight.dtype) for e in self.audio_tower(list(features), window_frames, part_of_longer_clip)]

    def embed_visual(
        self, pixel_values: torch.Tensor, grid_thw: Sequence[tuple[int, int, int]] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image or video tokens [Σ t·h·w/4, H] and DeepStack features [levels, Σ t·h·w/4, H], items in order."""
        if self.visual is None:
            raise ValueError("this checkpoint has no vision encoder (config.json lacks vision_config)")
        embeds, deepstack = self.visual(pixel_values, grid_thw)
        dtype = self.lm_head.weight.dtype
        return embeds.to(dtype), deepstack.to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
        deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [T, H] for a flat batch; positions are M-RoPE rows [3, T].

        deepstack_embeds [levels, T, H] (zero rows outside image/video placeholders) is added after layers 0..levels-1.
        """
        hidden = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        return self.model(hidden, positions, kv_caches, attn_metadata, deepstack_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 (the projection itself runs in the model dtype, like HF)."""
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load thinker-only checkpoint names; return the parameters whose every shard was loaded.

        Raises ValueError for a checkpoint name that matches no parameter.
        """
        return load_named_weights(self, weights, "thinker")
