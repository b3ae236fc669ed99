"""ThinkerConfig parsing (full and thinker-only schemas, 4.57 and 5.x rope fields), validation and the registry."""

from __future__ import annotations

import copy

import pytest

from omnistream.engine.checkpoint.model_config import ThinkerConfig
from omnistream.engine.model_executor.models.qwen3_omni_thinker import (
    Qwen3OmniThinkerForCausalLM,
)
from omnistream.engine.model_executor.models.registry import get_model_class

THINKER = {
    "architectures": ["Qwen3OmniMoeThinkerForConditionalGeneration"],
    "model_type": "qwen3_omni_moe_thinker",
    "dtype": "bfloat16",
    "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
    "audio_start_token_id": 151669, "audio_end_token_id": 151670,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "position_id_per_seconds": 13,
    "audio_config": {"d_model": 1280}, "vision_config": {"depth": 27},
    "text_config": {
        "vocab_size": 152064, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "decoder_sparse_step": 1, "mlp_only_layers": [], "shared_expert_intermediate_size": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20],
                            "interleaved": True, "mrope_interleaved": True},
    },
}


def thinker(**text_changes) -> dict:
    raw = copy.deepcopy(THINKER)
    raw["text_config"].update(text_changes)
    return raw


def test_thinker_only_schema():
    config = ThinkerConfig.from_dict(THINKER)
    assert config.text.head_dim == 128 and config.text.mrope_section == (24, 20, 20)
    assert config.text.rope_theta == 1e6 and config.dtype == "bfloat16"
    assert (config.audio_end_token_id, config.vision_start_token_id) == (151670, 151652)
    assert config.position_id_per_seconds == 13
    assert config.audio_config == {"d_model": 1280} and config.vision_config == {"depth": 27}


def test_full_schema_with_hf_457_rope_fields():
    inner = copy.deepcopy(THINKER)
    text = inner["text_config"]
    del text["rope_parameters"]
    text["rope_scaling"] = {"rope_type": "default", "type": "default", "mrope_section": [24, 20, 20]}
    text["rope_theta"] = 1000000
    raw = {"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
           "torch_dtype": "bfloat16", "thinker_config": inner, "talker_config": {}}
    config = ThinkerConfig.from_dict(raw)
    assert config.text.rope_theta == 1e6 and config.text.mrope_section == (24, 20, 20)
    assert config.dtype == "bfloat16"
    assert get_model_class(raw) is Qwen3OmniThinkerForCausalLM


@pytest.mark.parametrize(
    "raw, message",
    [
        (thinker(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 16]}),
         "sum\\(mrope_section\\)"),
        (thinker(head_dim=None), "head_dim"),
        (thinker(decoder_sparse_step=2), "dense MLP"),
        (thinker(mlp_only_layers=[3]), "dense MLP"),
        (thinker(shared_expert_intermediate_size=768), "shared expert"),
        (thinker(hidden_act="gelu"), "hidden_act"),
        (thinker(num_key_value_heads=5), "multiple of"),
        (thinker(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "mrope_section": [24, 20, 20]}), "rope_type"),
        ({**THINKER, "vision_start_token_id": None}, "vision_start_token_id"),
        ({**THINKER, "model_type": "qwen2_5_omni"}, "unsupported model_type"),
        ({"model_type": "qwen3_omni_moe"}, "thinker_config"),
    ],
)
def test_invalid_configs_raise(raw, message):
    with pytest.raises(ValueError, match=message):
        ThinkerConfig.from_dict(raw)


def test_registry_rejects_unknown_models_listing_supported_ones():
    assert get_model_class({"model_type": "qwen3_omni_moe_thinker"}) is Qwen3OmniThinkerForCausalLM
    with pytest.raises(ValueError, match="Qwen3OmniMoeThinkerForConditionalGeneration"):
        get_model_class({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
