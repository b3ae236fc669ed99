"""Tensor-parallel sharding of every layer's weight loader: TP=2 over gloo must reproduce TP=1 logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from tests.engine.tp_worker import compare_tp2_with_tp1

TEXT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=32,
            moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [6, 5, 5]})
TOKEN_IDS = dict(audio_token_id=251, image_token_id=252, video_token_id=253, audio_start_token_id=254,
                 audio_end_token_id=255, vision_start_token_id=249, vision_end_token_id=250, position_id_per_seconds=13)


def random_checkpoint(text: dict) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors (per-expert layout) with O(1) activations."""
    generator = torch.Generator().manual_seed(0)
    hidden, head_dim, inter = text["hidden_size"], text["head_dim"], text["moe_intermediate_size"]
    shapes = {"model.embed_tokens.weight": (text["vocab_size"], hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (text["vocab_size"], hidden)}
    for layer in range(text["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (text["num_attention_heads"] * head_dim, hidden),
            p + "self_attn.k_proj.weight": (text["num_key_value_heads"] * head_dim, hidden),
            p + "self_attn.v_proj.weight": (text["num_key_value_heads"] * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, text["num_attention_heads"] * head_dim),
            p + "self_attn.q_norm.weight": (head_dim,), p + "self_attn.k_norm.weight": (head_dim,),
            p + "mlp.gate.weight": (text["num_experts"], hidden),
        }
        for e in range(text["num_experts"]):
            shapes |= {f"{p}mlp.experts.{e}.gate_proj.weight": (inter, hidden),
                       f"{p}mlp.experts.{e}.up_proj.weight": (inter, hidden),
                       f"{p}mlp.experts.{e}.down_proj.weight": (hidden, inter)}
    tensors = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        tensors[name] = 1 + 0.1 * noise if len(shape) == 1 else noise / shape[-1] ** 0.5
    tensors["model.embed_tokens.weight"] *= shapes["model.embed_tokens.weight"][-1] ** 0.5
    return tensors


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["kv_split", "kv_replicated"])
def test_tp2_matches_tp1(tmp_path, monkeypatch, num_kv_heads):
    text = {**TEXT, "num_key_value_heads": num_kv_heads}
    config = {"model_type": "qwen3_omni_moe_thinker", "text_config": text, **TOKEN_IDS}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(random_checkpoint(text), tmp_path / "model.safetensors")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # spawned workers import tests.*
    mp.spawn(compare_tp2_with_tp1, args=(str(tmp_path), str(tmp_path / "dist_init")), nprocs=2)
