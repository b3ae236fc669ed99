"""Text-only parity of the thinker decoder against HF transformers, and the checkpoint loader's layouts and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omnistream.engine.model_executor.loader import load_model
from tests.parity.hf_oracle import (
    TINY,
    build_hf_thinker,
    head_dim_128_config,
    hf_logits,
)
from tests.parity.paged_runner import Chunk, PagedRunner

FP32_TOL = 1e-4
PRESETS = {"tiny": TINY, "head_dim_128": head_dim_128_config()}


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 152064, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Builds each preset's HF model and thinker-only save once: name -> (HF model, save dir)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            hf = build_hf_thinker(PRESETS[name])
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            cache[name] = hf, path
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset(request, hf_checkpoints):
    """(HF model, its thinker-only save dir, our fp32 model loaded from it)."""
    hf, path = hf_checkpoints(request.param)
    model, _ = load_model(path, "float32")
    return hf, path, model


@pytest.fixture(scope="module")
def tiny(hf_checkpoints):
    return hf_checkpoints("tiny")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads((path / "config.json").read_text())


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict, num_shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if num_shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = names[shard::num_shards]
        save_file({k: tensors[k] for k in part}, path / file)
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def one_shot_logits(model, token_ids: list[int]) -> torch.Tensor:
    return PagedRunner(model, num_requests=1).step([Chunk(0, token_ids)])


def test_single_prompt_matches_hf(preset):
    hf, _, model = preset
    ids = prompt(37, seed=1)
    err = (one_shot_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()
    assert err < FP32_TOL, f"max |logit diff| = {err:.2e}"


def test_distinct_mrope_rows_match_hf(preset):
    """Vision-like positions (T, H, W rows differ) given to HF as explicit 3-D position_ids."""
    hf, _, model = preset
    ids = prompt(30, seed=8)
    grid = torch.arange(12)
    positions = torch.arange(30).expand(3, -1).clone()
    positions[:, 10:22] = torch.stack([torch.full((12,), 10), 10 + grid // 4, 10 + grid % 4])
    positions[:, 22:] = torch.arange(14, 22)
    ours = PagedRunner(model, num_requests=1).step([Chunk(0, ids)], positions_3d=positions)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), position_ids=positions.unsqueeze(1)).logits[0]
    err = (ours - ref).abs().max().item()
    assert err < FP32_TOL, f"max |logit diff| = {err:.2e}"


def test_two_prompts_in_one_flat_batch_match_hf(preset):
    hf, _, model = preset
    a, b = prompt(23, seed=2), prompt(41, seed=3)
    logits = PagedRunner(model).step([Chunk(0, a), Chunk(1, b)])
    assert (logits[: len(a)] - hf_logits(hf, a)).abs().max().item() < FP32_TOL
    assert (logits[len(a) :] - hf_logits(hf, b)).abs().max().item() < FP32_TOL


def test_chunked_prefill_and_decode_match_one_shot(preset):
    hf, _, model = preset
    ids = prompt(40, seed=4)
    runner = PagedRunner(model, num_requests=1)
    parts = [
        runner.step([Chunk(0, ids[:18])]),
        runner.step([Chunk(0, ids[18:39], num_computed=18)]),
        runner.step([Chunk(0, ids[39:], num_computed=39)]),  # a single decode token
    ]
    chunked = torch.cat(parts)
    assert (chunked - one_shot_logits(model, ids)).abs().max().item() < 1e-5
    assert (chunked - hf_logits(hf, ids)).abs().max().item() < FP32_TOL


def test_full_layout_sharded_checkpoint(tiny, tmp_path):
    hf, path = tiny
    tensors, thinker_cfg = read_checkpoint(path)
    full = {f"thinker.{k}": v for k, v in tensors.items()}
    full["talker.model.norm.weight"] = torch.ones(8)
    full["code2wav.pre_transformer.norm.weight"] = torch.ones(8)
    config = {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"],
        "model_type": "qwen3_omni_moe",
        "thinker_config": thinker_cfg,
        "talker_config": {"model_type": "qwen3_omni_moe_talker"},
        "dtype": "float32",
    }
    model, config_out = load_model(write_checkpoint(tmp_path / "full", full, config, num_shards=3))
    assert config_out.audio_token_id == 151675 and config_out.text.mrope_section == (12, 10, 10)
    ids = prompt(20, seed=5)
    assert (one_shot_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < FP32_TOL


def test_fused_expert_tensors(tiny, tmp_path):
    hf, path = tiny
    tensors, config = read_checkpoint(path)
    num_layers = config["text_config"]["num_hidden_layers"]
    num_experts = config["text_config"]["num_experts"]
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        pop = lambda e, proj: tensors.pop(f"{prefix}.{e}.{proj}.weight")  # noqa: E731
        gate_up = [torch.cat([pop(e, "gate_proj"), pop(e, "up_proj")]) for e in range(num_experts)]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = torch.stack([pop(e, "down_proj") for e in range(num_experts)])
    model, _ = load_model(write_checkpoint(tmp_path / "fused", tensors, config))
    ids = prompt(20, seed=6)
    assert (one_shot_logits(model, ids) - hf_logits(hf, ids)).abs().max().item() < FP32_TOL


def test_bf16_checkpoint_loads_into_fp32_and_auto_dtype(tiny, tmp_path):
    _, path = tiny
    tensors, config = read_checkpoint(path)
    config["dtype"] = "bfloat16"
    bf16_dir = write_checkpoint(tmp_path / "bf16", {k: v.bfloat16() for k, v in tensors.items()}, config)
    model_auto, _ = load_model(bf16_dir)
    assert model_auto.lm_head.weight.dtype == torch.bfloat16
    model_fp32, _ = load_model(bf16_dir, "float32")
    norm = model_fp32.model.norm.weight
    assert norm.dtype == torch.float32
    assert torch.equal(norm, tensors["model.norm.weight"].bfloat16().float())


def test_fp32_checkpoint_loads_into_bf16_close_to_fp32(preset):
    _, path, model_fp32 = preset
    model_bf16, _ = load_model(path, torch.bfloat16)
    ids = prompt(30, seed=7)
    ref = one_shot_logits(model_fp32, ids)
    got = one_shot_logits(model_bf16, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.15, f"relative L2 error of bf16 logits = {rel:.3f}"


def test_unknown_tensor_is_an_error(tiny, tmp_path):
    _, path = tiny
    tensors, config = read_checkpoint(path)
    tensors["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(4)
    with pytest.raises(ValueError, match="model.layers.0.mlp.shared_expert.weight"):
        load_model(write_checkpoint(tmp_path / "unknown", tensors, config))


@pytest.mark.parametrize(
    "dropped, reported",
    [
        ("model.norm.weight", "model.norm.weight"),
        ("model.layers.1.mlp.experts.5.up_proj.weight", "model.layers.1.mlp.w13"),
    ],
)
def test_missing_tensor_is_an_error(tiny, tmp_path, dropped, reported):
    _, path = tiny
    tensors, config = read_checkpoint(path)
    del tensors[dropped]
    with pytest.raises(ValueError, match=reported):
        load_model(write_checkpoint(tmp_path / "missing", tensors, config))
