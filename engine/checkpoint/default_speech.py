"""The embedded default model's speech stack: talker, code predictor and code2wav configs in the real schema
at small widths, their checkpoint names and shapes, and seeded random weights scaled so that they test
something.

Real ids (codec 2148–2157, speakers 2301–2303), 16 code groups, vocabularies 3072/2048 and code2wav's real
rates and 72-frame window are kept, so a frame is 1920 samples and 555 of them wait for the next frame. Talker
weights are O(1) (fan-in scaled); the vocoder follows a calibration recipe (Snake α, β ~ N(0, 0.3), LayerScale
and γ 0.5, each residual unit's k1 conv × 0.2) and the preset's `vocoder_out_scale` sets its final conv so a
decode has a pre-clamp rms near 0.2: neither silent nor clipped (tests/parity/test_code2wav_parity.py measures
it).
"""

from __future__ import annotations

import re
from typing import Any

import torch

SPEAKERS = {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
CODEC_IDS = dict(
    codec_pad_id=2148,
    codec_bos_id=2149,
    codec_eos_token_id=2150,
    codec_nothink_id=2155,
    codec_think_bos_id=2156,
    codec_think_eos_id=2157,
)


def talker_config(preset: dict[str, Any], thinker_hidden_size: int) -> dict[str, Any]:
    """`talker_config` of config.json, every field HF gets wrong by default written out."""
    talker, predictor = preset["talker"], preset["code_predictor"]
    rope = dict(rope_type="default", rope_theta=1e6, mrope_section=talker["mrope_section"], interleaved=True)
    text_config = dict(
        model_type="qwen3_omni_moe_talker_text",
        vocab_size=3072,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=65536,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        attention_bias=False,
        sliding_window=None,
        tie_word_embeddings=False,
        rope_theta=1e6,
        rope_parameters=rope,
        **{k: v for k, v in talker.items() if k != "mrope_section"},
    )
    code_predictor_config = dict(
        model_type="qwen3_omni_moe_talker_code_predictor",
        vocab_size=2048,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        num_code_groups=16,
        attention_bias=False,
        tie_word_embeddings=False,
        rope_theta=1e6,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
        hidden_size=talker["hidden_size"],
        **predictor,
    )
    return dict(
        model_type="qwen3_omni_moe_talker",
        text_config=text_config,
        code_predictor_config=code_predictor_config,
        num_code_groups=16,
        thinker_hidden_size=thinker_hidden_size,
        accept_hidden_layer=preset["accept_hidden_layer"],
        speaker_id=SPEAKERS,
        audio_token_id=151675,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        audio_start_token_id=151669,
        position_id_per_seconds=13,
        spatial_merge_size=2,
        **CODEC_IDS,
    )


def code2wav_config(preset: dict[str, Any]) -> dict[str, Any]:
    """`code2wav_config` of config.json: the real codebooks, rates and window at the preset's widths."""
    return dict(
        model_type="qwen3_omni_moe_code2wav",
        codebook_size=2048,
        num_quantizers=16,
        sliding_window=72,
        upsample_rates=[8, 5, 4, 3],
        upsampling_ratios=[2, 2],
        rms_norm_eps=1e-5,
        hidden_act="silu",
        layer_scale_initial_scale=0.01,
        attention_bias=False,
        max_position_embeddings=8000,
        **preset["code2wav"],
    )


def speech_weight_shapes(talker: dict[str, Any], code2wav: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every `talker.*` and `code2wav.*` tensor of a full checkpoint (per-expert names, as HF saves) and its
    shape."""
    return {**_talker_shapes(talker), **_code2wav_shapes(code2wav)}


def speech_weights(
    shapes: dict[str, tuple[int, ...]], seed: int, vocoder_out_scale: float
) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights for `speech_weight_shapes`, drawn in name order (bit-reproducible)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weights = {name: _draw(name, shapes[name], gen) for name in sorted(shapes)}
    last = max(int(m.group(1)) for m in map(re.compile(r"code2wav\.decoder\.(\d+)\.").match, shapes) if m)
    for name in (f"code2wav.decoder.{last}.conv.weight", f"code2wav.decoder.{last}.conv.bias"):
        weights[name] = vocoder_out_scale * weights[name]  # the output conv sets the loudness
    return weights


_TRANSPOSED = re.compile(r"code2wav\.(upsample\.\d+\.0|decoder\.\d+\.block\.1)\.conv\.weight")
_SNAKE = re.compile(r"code2wav\..*\.(alpha|beta)")


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if _SNAKE.fullmatch(name):
        return 0.3 * noise
    if name.endswith(("layer_scale.scale", ".gamma")):
        return torch.full(shape, 0.5)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias") or "embedding" in name:
        weight = 0.1 * noise if name.endswith(".bias") else noise
    elif _TRANSPOSED.fullmatch(
        name
    ):  # [C_in, C_out, k]: each output sums C_in·k/stride terms (k/stride = 1 or 2)
        taps = 1 if ".upsample." in name else 2
        weight = noise / (shape[0] * taps) ** 0.5
    else:  # [out, in] or [out, in/groups, k]
        weight = noise / (shape[1] * (shape[2] if len(shape) == 3 else 1)) ** 0.5
    if re.fullmatch(r"code2wav\.decoder\.\d+\.block\.\d+\.conv2\.conv\.(weight|bias)", name):
        weight = 0.2 * weight  # residual units' k1 convs: keeps every stage near unit rms
    return weight


def _talker_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    text, cp = c["text_config"], c["code_predictor_config"]
    h, d, e, f = text["hidden_size"], text["head_dim"], text["num_experts"], text["moe_intermediate_size"]
    q, kv, shared, vocab = (
        text["num_attention_heads"] * d,
        text["num_key_value_heads"] * d,
        text["shared_expert_intermediate_size"],
        text["vocab_size"],
    )
    th, width = c["thinker_hidden_size"], text["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "talker.model.codec_embedding.weight": (vocab, h),
        "talker.model.norm.weight": (h,),
        "talker.codec_head.weight": (vocab, h),
    }
    for proj in ("text_projection", "hidden_projection"):
        p = f"talker.{proj}."
        shapes |= {
            p + "linear_fc1.weight": (width, th),
            p + "linear_fc1.bias": (width,),
            p + "linear_fc2.weight": (h, width),
            p + "linear_fc2.bias": (h,),
        }
    for i in range(text["num_hidden_layers"]):
        p = f"talker.model.layers.{i}."
        shapes |= _attention_shapes(p, h, q, kv, d) | {
            p + "mlp.gate.weight": (e, h),
            p + "mlp.shared_expert_gate.weight": (1, h),
            **_mlp_shapes(p + "mlp.shared_expert.", h, shared),
        }
        for j in range(e):
            shapes |= _mlp_shapes(p + f"mlp.experts.{j}.", h, f)
    ch, cd = cp["hidden_size"], cp["head_dim"]
    shapes["talker.code_predictor.model.norm.weight"] = (ch,)
    for g in range(cp["num_code_groups"] - 1):
        shapes[f"talker.code_predictor.model.codec_embedding.{g}.weight"] = (cp["vocab_size"], ch)
        shapes[f"talker.code_predictor.lm_head.{g}.weight"] = (cp["vocab_size"], ch)
    for i in range(cp["num_hidden_layers"]):
        p = f"talker.code_predictor.model.layers.{i}."
        shapes |= _attention_shapes(p, ch, cp["num_attention_heads"] * cd, cp["num_key_value_heads"] * cd, cd)
        shapes |= _mlp_shapes(p + "mlp.", ch, cp["intermediate_size"])
    return shapes


def _attention_shapes(p: str, h: int, q: int, kv: int, head_dim: int | None) -> dict[str, tuple[int, ...]]:
    shapes = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
    }
    if head_dim is not None:
        shapes |= {p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,)}
    return shapes


def _mlp_shapes(p: str, h: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        p + "gate_proj.weight": (width, h),
        p + "up_proj.weight": (width, h),
        p + "down_proj.weight": (h, width),
    }


def _code2wav_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    kv = c["num_key_value_heads"] * h // heads
    shapes: dict[str, tuple[int, ...]] = {
        "code2wav.code_embedding.weight": (c["codebook_size"] * c["num_quantizers"], h),
        "code2wav.pre_transformer.norm.weight": (h,),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"code2wav.pre_transformer.layers.{i}."
        shapes |= _attention_shapes(p, h, h, kv, None) | _mlp_shapes(p + "mlp.", h, c["intermediate_size"])
        shapes |= {p + "self_attn_layer_scale.scale": (h,), p + "mlp_layer_scale.scale": (h,)}
    for i, ratio in enumerate(c["upsampling_ratios"]):
        p = f"code2wav.upsample.{i}."
        shapes |= {
            p + "0.conv.weight": (h, h, ratio),
            p + "0.conv.bias": (h,),
            p + "1.dwconv.conv.weight": (h, 1, 7),
            p + "1.dwconv.conv.bias": (h,),
            p + "1.norm.weight": (h,),
            p + "1.norm.bias": (h,),
            p + "1.gamma": (h,),
            p + "1.pwconv1.weight": (4 * h, h),
            p + "1.pwconv1.bias": (4 * h,),
            p + "1.pwconv2.weight": (h, 4 * h),
            p + "1.pwconv2.bias": (h,),
        }
    dim = c["decoder_dim"]
    shapes |= {"code2wav.decoder.0.conv.weight": (dim, h, 7), "code2wav.decoder.0.conv.bias": (dim,)}
    for i, rate in enumerate(c["upsample_rates"], start=1):
        p, out = f"code2wav.decoder.{i}.block.", dim // 2
        shapes |= {
            p + "0.alpha": (dim,),
            p + "0.beta": (dim,),
            p + "1.conv.weight": (dim, out, 2 * rate),
            p + "1.conv.bias": (out,),
        }
        for unit in (2, 3, 4):
            u = f"{p}{unit}."
            shapes |= {
                u + "act1.alpha": (out,),
                u + "act1.beta": (out,),
                u + "act2.alpha": (out,),
                u + "act2.beta": (out,),
                u + "conv1.conv.weight": (out, out, 7),
                u + "conv1.conv.bias": (out,),
                u + "conv2.conv.weight": (out, out, 1),
                u + "conv2.conv.bias": (out,),
            }
        dim = out
    last = len(c["upsample_rates"]) + 1
    shapes |= {
        f"code2wav.decoder.{last}.alpha": (dim,),
        f"code2wav.decoder.{last}.beta": (dim,),
        f"code2wav.decoder.{last + 1}.conv.weight": (1, dim, 7),
        f"code2wav.decoder.{last + 1}.conv.bias": (1,),
    }
    return shapes
