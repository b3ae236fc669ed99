"""The embedded default model: deterministic bytes, the real config schema, and HF's exact weight names and shapes."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from omnistream.engine.checkpoint.default_model import (
    PRESETS,
    build_config,
    default_model_path,
    thinker_weight_shapes,
)
from omnistream.engine.checkpoint.default_speech import speech_weight_shapes

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMNISTREAM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return default_model_path()


def test_build_is_deterministic_and_cached(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNISTREAM_CACHE_DIR", str(tmp_path))
    other = default_model_path("tiny")
    assert other.name == model_dir.name and other.parent == tmp_path / "models"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert default_model_path("tiny") == other  # second call reuses the directory
    assert [p.name for p in (tmp_path / "models").iterdir()] == [other.name]  # no temp dirs left behind


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown default-model preset"):
        default_model_path("huge")


def test_config_schema(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    assert config["model_type"] == "qwen3_omni_moe" and config["enable_audio_output"] is True
    thinker = transformers.Qwen3OmniMoeThinkerConfig(**config["thinker_config"])
    assert (thinker.audio_token_id, thinker.image_token_id, thinker.video_token_id) == (151675, 151655, 151656)
    assert (thinker.audio_start_token_id, thinker.audio_end_token_id) == (151669, 151670)
    assert (thinker.vision_start_token_id, thinker.position_id_per_seconds) == (151652, 13)
    text = thinker.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim, text.vocab_size) == (128, 4, 64, 152064)
    assert text.rope_parameters["mrope_section"] == [12, 10, 10] and text.rope_parameters["rope_theta"] == 1e6
    assert config["thinker_config"]["text_config"]["rope_scaling"]["mrope_interleaved"] is True
    assert thinker.audio_config.output_dim == thinker.vision_config.out_hidden_size == 128
    assert isinstance(transformers.AutoConfig.from_pretrained(model_dir), transformers.Qwen3OmniMoeConfig)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["pad_token_id"] == 151643


def test_names_and_shapes_match_what_hf_saves(tmp_path):
    thinker_config = build_config(PRESETS["tiny"])["thinker_config"]
    torch.manual_seed(0)
    hf = transformers.Qwen3OmniMoeThinkerForConditionalGeneration(
        transformers.Qwen3OmniMoeThinkerConfig(**thinker_config)
    )
    hf.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        hf_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ours = {k.removeprefix("thinker."): v for k, v in thinker_weight_shapes(thinker_config).items()}
    assert ours == hf_shapes


def test_the_speech_stack_has_the_real_ids_and_rates(model_dir):
    config = transformers.AutoConfig.from_pretrained(model_dir)
    talker, code2wav = config.talker_config, config.code2wav_config
    assert (talker.codec_pad_id, talker.codec_bos_id, talker.codec_eos_token_id) == (2148, 2149, 2150)
    assert (talker.codec_nothink_id, talker.codec_think_bos_id, talker.codec_think_eos_id) == (2155, 2156, 2157)
    assert talker.speaker_id == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert talker.num_code_groups == talker.code_predictor_config.num_code_groups == 16
    assert (talker.audio_token_id, talker.position_id_per_seconds, talker.spatial_merge_size) == (151675, 13, 2)
    assert talker.accept_hidden_layer == 2 < config.thinker_config.text_config.num_hidden_layers
    text = talker.text_config
    assert (text.vocab_size, text.num_experts_per_tok, text.norm_topk_prob) == (3072, 3, True)
    assert text.num_experts_per_tok < text.num_experts and text.shared_expert_intermediate_size > 0
    assert text.rope_parameters["rope_theta"] == talker.code_predictor_config.rope_parameters["rope_theta"] == 1e6
    assert talker.code_predictor_config.vocab_size == 2048
    assert (list(code2wav.upsample_rates), list(code2wav.upsampling_ratios)) == ([8, 5, 4, 3], [2, 2])
    assert code2wav.sliding_window == 72 and code2wav.num_quantizers == 16


def test_speech_names_and_shapes_match_what_hf_saves(tmp_path):
    raw = build_config(PRESETS["tiny"])
    torch.manual_seed(0)
    config = transformers.Qwen3OmniMoeConfig(**raw)
    hf = transformers.Qwen3OmniMoeForConditionalGeneration(config)
    hf.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        hf_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not k.startswith("thinker.")}
    assert speech_weight_shapes(raw["talker_config"], raw["code2wav_config"]) == hf_shapes


def test_weights_load_into_hf_strictly(model_dir):
    model, info = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        model_dir, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = load_file(model_dir / "model.safetensors")
    state = model.thinker.state_dict()
    fused = state["model.language_model.layers.1.mlp.experts.gate_up_proj"]
    prefix = "thinker.model.layers.1.mlp.experts.5."
    expected = torch.cat([ours[prefix + "gate_proj.weight"], ours[prefix + "up_proj.weight"]])
    assert torch.equal(fused[5], expected)
    assert torch.equal(state["lm_head.weight"], ours["thinker.lm_head.weight"])
    assert torch.equal(state["model.audio_tower.proj2.bias"], ours["thinker.audio_tower.proj2.bias"])
    assert all(t.dtype == torch.float32 for t in ours.values())

    input_ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]])
    logits = model.thinker(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    assert logits.shape == (1, 9, 152064) and torch.isfinite(logits).all()


def test_norms_and_biases_are_not_trivial(model_dir):
    ours = load_file(model_dir / "model.safetensors")
    norm = ours["thinker.model.layers.0.input_layernorm.weight"]
    assert 0.9 < norm.mean() < 1.1 and norm.std() > 0
    assert ours["thinker.visual.blocks.0.attn.qkv.bias"].abs().sum() > 0
