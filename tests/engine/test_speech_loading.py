"""Speech-model loading: the config is read from config.json (real ids, never HF's defaults; missing fields
are errors), only `talker.*`/`code2wav.*` tensors are read, a missing or stray tensor is an error, and
checkpoints without audio output give no speech models.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from omnistream.engine.checkpoint.default_model import PRESETS, build_config, default_model_path
from omnistream.engine.checkpoint.default_speech import speech_weight_shapes, speech_weights
from omnistream.engine.checkpoint.speech_config import SpeechConfig
from omnistream.engine.model_executor.speech_loader import load_speech_models

RAW = build_config(PRESETS["tiny"])


def _write(path, raw, weights):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    save_file(weights, str(path / "model.safetensors"))
    return path


def _speech_weights():
    return speech_weights(speech_weight_shapes(RAW["talker_config"], RAW["code2wav_config"]), 0, 0.1)


def test_the_embedded_model_loads_its_speech_stack_with_the_real_ids():
    models = load_speech_models(default_model_path(), dtype="bfloat16")
    talker = models.config.talker
    assert (talker.codec_pad_id, talker.codec_bos_id, talker.codec_eos_token_id) == (2148, 2149, 2150)
    assert talker.speakers == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert talker.num_code_groups == 16 and talker.text.num_experts == 8 and talker.accept_hidden_layer == 2
    assert models.config.tts_pad_token_id == 151671 and models.config.assistant_token_id == 77091
    code2wav = models.config.code2wav
    assert code2wav.samples_per_frame == 1920 and code2wav.num_samples(5) == 5 * 1920 - 555
    assert models.talker.codec_head.weight.dtype == torch.bfloat16
    assert next(models.code2wav.parameters()).dtype == torch.bfloat16


def test_checkpoints_without_audio_output_have_no_speech_models(tmp_path):
    off = dict(RAW, enable_audio_output=False)
    assert load_speech_models(_write(tmp_path / "off", off, {"x": torch.zeros(1)})) is None
    thinker_only = RAW["thinker_config"]
    assert SpeechConfig.from_dict(thinker_only) is None


def test_a_missing_speech_tensor_is_an_error(tmp_path):
    weights = _speech_weights()
    del weights["talker.code_predictor.lm_head.14.weight"]
    with pytest.raises(
        ValueError, match=r"lacks 1 speech weights: \['talker.code_predictor.lm_head.14.weight'\]"
    ):
        load_speech_models(_write(tmp_path / "m", RAW, weights))


def test_a_stray_speech_tensor_is_an_error(tmp_path):
    weights = _speech_weights() | {"code2wav.decoder.9.conv.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="'decoder.9.conv.weight' matches no parameter of the code2wav"):
        load_speech_models(_write(tmp_path / "m", RAW, weights))


def test_speech_loading_reads_fused_expert_tensors_too(tmp_path):
    weights = _speech_weights()
    prefix = "talker.model.layers.0.mlp.experts."
    experts = range(RAW["talker_config"]["text_config"]["num_experts"])
    gate_up = torch.stack(
        [
            torch.cat(
                (weights.pop(f"{prefix}{e}.gate_proj.weight"), weights.pop(f"{prefix}{e}.up_proj.weight"))
            )
            for e in experts
        ]
    )
    down = torch.stack([weights.pop(f"{prefix}{e}.down_proj.weight") for e in experts])
    models = load_speech_models(
        _write(tmp_path / "m", RAW, weights | {prefix + "gate_up_proj": gate_up, prefix + "down_proj": down})
    )
    assert torch.equal(models.talker.model.layers[0].mlp.w2, down)


@pytest.mark.parametrize(
    "field, section",
    [
        ("speaker_id", "talker_config"),
        ("codec_eos_token_id", "talker_config"),
        ("accept_hidden_layer", "talker_config"),
        ("num_code_groups", "talker_config"),
        ("upsample_rates", "code2wav_config"),
        ("tts_pad_token_id", None),
    ],
)
def test_a_missing_speech_field_is_named_not_defaulted(field, section):
    raw = copy.deepcopy(RAW)
    del (raw[section] if section else raw)[field]
    with pytest.raises(ValueError, match=f"missing required field '{field}'"):
        SpeechConfig.from_dict(raw)


def test_mismatched_code_groups_are_refused():
    raw = copy.deepcopy(RAW)
    raw["talker_config"]["code_predictor_config"]["num_code_groups"] = 32  # HF's default
    with pytest.raises(
        ValueError, match=r"num_code_groups \(32\) must equal talker_config.num_code_groups \(16\)"
    ):
        SpeechConfig.from_dict(raw)
