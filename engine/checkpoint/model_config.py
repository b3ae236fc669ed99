"""Thinker configuration parsed from a checkpoint's config.json (full Qwen3-Omni or thinker-only save).

Owns validation of what the engine supports; it does not build modules. Encoder configs stay raw dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FULL_MODEL_TYPE = "qwen3_omni_moe"
THINKER_MODEL_TYPE = "qwen3_omni_moe_thinker"

_TOKEN_ID_FIELDS = (
    "audio_token_id",
    "image_token_id",
    "video_token_id",
    "audio_start_token_id",
    "audio_end_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)


@dataclass(frozen=True)
class TextConfig:
    """The MoE text decoder: every layer sparse, interleaved M-RoPE, untied lm_head."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    attention_bias: bool
    max_position_embeddings: int


@dataclass(frozen=True)
class ThinkerConfig:
    """Everything the thinker needs: text decoder, raw encoder configs and the special token ids."""

    text: TextConfig
    audio_config: dict[str, Any]
    vision_config: dict[str, Any]
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    position_id_per_seconds: float
    dtype: str | None  # the checkpoint's dtype field, e.g. "bfloat16"

    @classmethod
    def from_file(cls, path: str | Path) -> ThinkerConfig:
        """Parse a config.json file."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ThinkerConfig:
        """Parse a config.json dict in the full (thinker under `thinker_config`) or thinker-only schema."""
        thinker = thinker_section(raw)
        text_raw = require(thinker, "text_config", "thinker config")
        if text_raw.get("shared_expert_intermediate_size", 0):
            raise ValueError("a shared expert is not supported (the thinker has none)")
        ids = {name: int(require(thinker, name, "thinker config")) for name in _TOKEN_ID_FIELDS}
        dtype = raw.get("dtype") or raw.get("torch_dtype") or thinker.get("dtype") or text_raw.get("dtype")
        return cls(
            text=parse_text_config(text_raw),
            audio_config=dict(thinker.get("audio_config") or {}),
            vision_config=dict(thinker.get("vision_config") or {}),
            position_id_per_seconds=float(require(thinker, "position_id_per_seconds", "thinker config")),
            dtype=dtype,
            **ids,
        )


def thinker_section(raw: dict[str, Any]) -> dict[str, Any]:
    """The thinker's part of a config.json, whichever schema it uses."""
    model_type = raw.get("model_type")
    if model_type == FULL_MODEL_TYPE or "thinker_config" in raw:
        return require(raw, "thinker_config", "full Qwen3-Omni config")
    if model_type == THINKER_MODEL_TYPE:
        return raw
    raise ValueError(
        f"unsupported model_type {model_type!r}: expected {FULL_MODEL_TYPE!r} or {THINKER_MODEL_TYPE!r}"
    )


def parse_text_config(raw: dict[str, Any], where: str = "text_config") -> TextConfig:
    """An MoE decoder's `text_config` (the thinker's, or the talker's whose shared expert its caller reads)."""
    _check_supported(raw)
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported rope_type {rope_type!r}: only 'default' M-RoPE is implemented")
    rope_theta = rope.get("rope_theta", raw.get("rope_theta"))
    if rope_theta is None:
        raise ValueError(f"{where}: missing rope_theta (in rope_parameters or at the top level)")
    section = rope.get("mrope_section")
    if section is None or len(section) != 3:
        raise ValueError(f"{where}: mrope_section must list 3 sizes (T, H, W), got {section!r}")
    text = TextConfig(
        vocab_size=int(require(raw, "vocab_size", where)),
        hidden_size=int(require(raw, "hidden_size", where)),
        num_hidden_layers=int(require(raw, "num_hidden_layers", where)),
        num_attention_heads=int(require(raw, "num_attention_heads", where)),
        num_key_value_heads=int(require(raw, "num_key_value_heads", where)),
        head_dim=int(require(raw, "head_dim", where)),
        moe_intermediate_size=int(require(raw, "moe_intermediate_size", where)),
        num_experts=int(require(raw, "num_experts", where)),
        num_experts_per_tok=int(require(raw, "num_experts_per_tok", where)),
        norm_topk_prob=bool(require(raw, "norm_topk_prob", where)),
        rms_norm_eps=float(require(raw, "rms_norm_eps", where)),
        rope_theta=float(rope_theta),
        mrope_section=(int(section[0]), int(section[1]), int(section[2])),
        attention_bias=bool(raw.get("attention_bias", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 65536)),
    )
    _check_shapes(text)
    return text


def _check_supported(raw: dict[str, Any]) -> None:
    """Reject features of the Qwen3-MoE family that neither decoder uses and we do not implement."""
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {raw['hidden_act']!r}: only 'silu' is implemented")
    if raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
        raise ValueError("dense MLP layers are not supported: need decoder_sparse_step == 1 and mlp_only_layers == []")
    if raw.get("use_sliding_window") or raw.get("sliding_window"):
        raise ValueError("sliding-window attention is not supported (the thinker uses full causal attention)")
    if raw.get("tie_word_embeddings", False):
        raise ValueError("tied word embeddings are not supported (the thinker's lm_head is a separate weight)")


def _check_shapes(text: TextConfig) -> None:
    if text.num_attention_heads % text.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads ({text.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({text.num_key_value_heads})"
        )
    if text.head_dim % 2 or sum(text.mrope_section) != text.head_dim // 2:
        raise ValueError(
            f"sum(mrope_section) = {sum(text.mrope_section)} must equal head_dim/2 = {text.head_dim / 2} "
            f"(mrope_section={list(text.mrope_section)}, head_dim={text.head_dim})"
        )
    if not 0 < text.num_experts_per_tok <= text.num_experts:
        raise ValueError(
            f"num_experts_per_tok ({text.num_experts_per_tok}) must be in 1..num_experts ({text.num_experts})"
        )


def require(raw: dict[str, Any], key: str, where: str) -> Any:
    if raw.get(key) is None:
        raise ValueError(f"{where}: missing required field {key!r}")
    return raw[key]


def read_model_config(model_dir: str | Path) -> dict:
    """The checkpoint's config.json as a dict (`ThinkerConfig.from_dict` reads either layout)."""
    with open(Path(model_dir) / "config.json") as f:
        return json.load(f)
