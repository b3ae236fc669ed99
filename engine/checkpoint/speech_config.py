"""Speech-output configuration (talker, code predictor, code2wav) parsed from a full Qwen3-Omni config.json.

Every id and size is read from the file: HF's class defaults for these models are wrong for the real
checkpoint (codec ids, code groups, top-k, hidden layer), so a missing field is an error, never a default. It
builds no modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omnistream.engine.checkpoint.model_config import (
    FULL_MODEL_TYPE,
    TextConfig,
    parse_text_config,
    require,
)

_TALKER_IDS = (
    "codec_pad_id",
    "codec_bos_id",
    "codec_eos_token_id",
    "codec_nothink_id",
    "codec_think_bos_id",
    "codec_think_eos_id",
    "audio_token_id",
    "image_token_id",
    "video_token_id",
)
_TOP_IDS = (
    "tts_pad_token_id",
    "tts_bos_token_id",
    "tts_eos_token_id",
    "im_start_token_id",
    "im_end_token_id",
    "system_token_id",
    "user_token_id",
    "assistant_token_id",
)


@dataclass(frozen=True)
class CodePredictorConfig:
    """The dense decoder that adds codebooks 1..G-1 to each frame (1-D RoPE, q/k RMSNorm, GQA, SwiGLU)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    num_code_groups: int


@dataclass(frozen=True)
class TalkerConfig:
    """The talker: an MoE decoder with a shared expert over its own codec vocabulary, plus its input
    projections."""

    text: TextConfig
    shared_expert_intermediate_size: int
    projection_size: int  # text_config.intermediate_size: the hidden width of text/hidden_projection only
    thinker_hidden_size: int
    accept_hidden_layer: int  # the thinker's hidden_states index whose rows feed hidden_projection
    num_code_groups: int
    codec_pad_id: int
    codec_bos_id: int
    codec_eos_token_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    audio_token_id: int
    image_token_id: int
    video_token_id: int
    position_id_per_seconds: float
    spatial_merge_size: int
    speakers: dict[str, int]  # lower-cased speaker name -> talker-vocabulary id
    code_predictor: CodePredictorConfig


@dataclass(frozen=True)
class Code2WavConfig:
    """The vocoder: code embedding mean, sliding-window transformer, ×2 upsamplers, causal Snake ConvNet."""

    codebook_size: int
    num_quantizers: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    upsample_rates: tuple[int, ...]
    upsampling_ratios: tuple[int, ...]
    decoder_dim: int

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * math.prod(self.upsampling_ratios)

    def num_samples(self, num_frames: int) -> int:
        """Samples a decode of `num_frames` frames yields (each ConvT(k=2r, s=r): L inputs → (L-1)·r)."""
        length = num_frames * math.prod(self.upsampling_ratios)
        for rate in self.upsample_rates:
            length = (length - 1) * rate
        return max(length, 0)


@dataclass(frozen=True)
class SpeechConfig:
    """The three speech models and the thinker-side token ids that build the talker's prompt."""

    talker: TalkerConfig
    code2wav: Code2WavConfig
    tts_pad_token_id: int
    tts_bos_token_id: int
    tts_eos_token_id: int
    im_start_token_id: int
    im_end_token_id: int
    system_token_id: int
    user_token_id: int
    assistant_token_id: int

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SpeechConfig | None:
        """The speech config of a config.json dict, or None when it has no audio output (a thinker-only save,
        or `enable_audio_output` false; absent means true, as in HF)."""
        if raw.get("model_type") != FULL_MODEL_TYPE or not raw.get("enable_audio_output", True):
            return None
        return cls(
            talker=_parse_talker(require(raw, "talker_config", "config.json with enable_audio_output")),
            code2wav=parse_code2wav_config(
                require(raw, "code2wav_config", "config.json with enable_audio_output")
            ),
            **{name: int(require(raw, name, "config.json")) for name in _TOP_IDS},
        )


def _rope_theta(raw: dict[str, Any], where: str, default: float | None = None) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: only the 'default' rope_type is implemented, got {rope!r}")
    theta = rope.get("rope_theta", raw.get("rope_theta", default))
    if theta is None:
        raise ValueError(f"{where}: missing rope_theta (in rope_parameters or at the top level)")
    return float(theta)


def _parse_talker(raw: dict[str, Any]) -> TalkerConfig:
    where = "talker_config"
    text_raw = dict(require(raw, "text_config", where))
    text_raw.setdefault("num_experts", text_raw.get("num_local_experts"))  # HF saves the attribute's alias
    shared = int(require(text_raw, "shared_expert_intermediate_size", "talker text_config"))
    groups = int(require(raw, "num_code_groups", where))
    predictor = _parse_code_predictor(require(raw, "code_predictor_config", where))
    if predictor.num_code_groups != groups:
        raise ValueError(
            f"code_predictor_config.num_code_groups ({predictor.num_code_groups}) must equal "
            f"talker_config.num_code_groups ({groups})"
        )
    text = parse_text_config(text_raw, "talker text_config")
    if predictor.hidden_size != text.hidden_size:
        raise ValueError(
            f"the code predictor's hidden_size ({predictor.hidden_size}) must equal the talker's "
            f"({text.hidden_size}): it reads the talker's hidden state and codec embedding"
        )
    speakers = require(raw, "speaker_id", where)
    return TalkerConfig(
        text=text,
        shared_expert_intermediate_size=shared,
        projection_size=int(require(text_raw, "intermediate_size", "talker text_config")),
        thinker_hidden_size=int(require(raw, "thinker_hidden_size", where)),
        accept_hidden_layer=int(require(raw, "accept_hidden_layer", where)),
        num_code_groups=groups,
        position_id_per_seconds=float(require(raw, "position_id_per_seconds", where)),
        spatial_merge_size=int(require(raw, "spatial_merge_size", where)),
        speakers={str(name).lower(): int(value) for name, value in speakers.items()},
        code_predictor=predictor,
        **{name: int(require(raw, name, where)) for name in _TALKER_IDS},
    )


def _parse_code_predictor(raw: dict[str, Any]) -> CodePredictorConfig:
    where = "code_predictor_config"
    return CodePredictorConfig(
        vocab_size=int(require(raw, "vocab_size", where)),
        hidden_size=int(require(raw, "hidden_size", where)),
        intermediate_size=int(require(raw, "intermediate_size", where)),
        num_hidden_layers=int(require(raw, "num_hidden_layers", where)),
        num_attention_heads=int(require(raw, "num_attention_heads", where)),
        num_key_value_heads=int(require(raw, "num_key_value_heads", where)),
        head_dim=int(require(raw, "head_dim", where)),
        rms_norm_eps=float(require(raw, "rms_norm_eps", where)),
        rope_theta=_rope_theta(raw, where),
        attention_bias=bool(raw.get("attention_bias", False)),
        num_code_groups=int(require(raw, "num_code_groups", where)),
    )


def parse_code2wav_config(raw: dict[str, Any]) -> Code2WavConfig:
    """A `code2wav_config` section of config.json."""
    where = "code2wav_config"
    hidden, heads = int(require(raw, "hidden_size", where)), int(require(raw, "num_attention_heads", where))
    rates = tuple(int(r) for r in require(raw, "upsample_rates", where))
    config = Code2WavConfig(
        codebook_size=int(require(raw, "codebook_size", where)),
        num_quantizers=int(require(raw, "num_quantizers", where)),
        hidden_size=hidden,
        intermediate_size=int(require(raw, "intermediate_size", where)),
        num_hidden_layers=int(require(raw, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=int(require(raw, "num_key_value_heads", where)),
        head_dim=int(raw.get("head_dim") or hidden // heads),  # HF's rule: the key is not declared
        sliding_window=int(require(raw, "sliding_window", where)),
        rms_norm_eps=float(require(raw, "rms_norm_eps", where)),
        rope_theta=_rope_theta(raw, where, default=10000.0),  # the real config leaves it to HF's 1e4
        attention_bias=bool(raw.get("attention_bias", False)),
        upsample_rates=rates,
        upsampling_ratios=tuple(int(r) for r in require(raw, "upsampling_ratios", where)),
        decoder_dim=int(require(raw, "decoder_dim", where)),
    )
    if config.decoder_dim % 2 ** len(rates):
        raise ValueError(f"{where}: decoder_dim ({config.decoder_dim}) must halve {len(rates)} times")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: unsupported hidden_act {raw['hidden_act']!r}: only 'silu' is implemented")
    return config
