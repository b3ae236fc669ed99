"""Export the thinker's text decoder of a checkpoint as a plain Qwen3-MoE causal LM directory.

For text, the thinker's decoder is exactly Qwen3-MoE (M-RoPE with equal rows is 1-D RoPE), so
transformers' and vLLM's Qwen3MoeForCausalLM run the identical computation on the same weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")


def _thinker_text_config(config: dict) -> dict:
    thinker = config.get("thinker_config", config)
    return thinker["text_config"]


def qwen3_moe_config(text: dict, dtype: str = "float32") -> dict:
    """The Qwen3MoeForCausalLM config.json for a thinker `text_config` (weights stored in `dtype`)."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": text["vocab_size"],
        "hidden_size": text["hidden_size"],
        "intermediate_size": text.get("intermediate_size", text["moe_intermediate_size"]),
        "moe_intermediate_size": text["moe_intermediate_size"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text["num_key_value_heads"],
        "head_dim": text["head_dim"],
        "num_experts": text["num_experts"],
        "num_experts_per_tok": text["num_experts_per_tok"],
        "norm_topk_prob": text.get("norm_topk_prob", True),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": text["rms_norm_eps"],
        "max_position_embeddings": text["max_position_embeddings"],
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": dtype,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


def export_qwen3_moe(model_dir: str | Path, out_dir: str | Path) -> Path:
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = qwen3_moe_config(_thinker_text_config(json.loads((model_dir / "config.json").read_text())))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                short = name.removeprefix("thinker.")
                if short.startswith(("model.", "lm_head.")) and not name.startswith(("talker.", "code2wav.")):
                    tensors[short] = f.get_tensor(name).contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name in _TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out_dir / name)
    return out_dir
