"""HF transformers side of the speech parity tests: the full tiny model (thinker, talker, code2wav) built from
the embedded preset's config, with seeded O(1) talker weights and the calibrated vocoder, saved with
save_pretrained.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

from omnistream.engine.checkpoint.default_model import PRESETS, build_config, default_model_path
from omnistream.engine.checkpoint.default_speech import speech_weight_shapes, speech_weights

RAW_CONFIG = build_config(PRESETS["tiny"])
PRE_CLAMP_RMS = 0.2  # what the oracle's vocoder output conv is scaled to


def build_hf_omni(seed: int = 0) -> Qwen3OmniMoeForConditionalGeneration:
    """A float32 HF Qwen3-Omni with talker and code2wav: thinker and talker weights N(0,1)/sqrt(fan-in) (norms
    1 + 0.1·N, embeddings and 1-D tensors N(0,1)); code2wav drawn by the preset's recipe, its output conv then
    rescaled so HF's decode of a fixed code sequence has a pre-clamp rms of PRE_CLAMP_RMS."""
    model = Qwen3OmniMoeForConditionalGeneration._from_config(
        Qwen3OmniMoeConfig(**copy.deepcopy(RAW_CONFIG)),
        attn_implementation="sdpa",
        experts_implementation="eager",
        dtype=torch.float32,
    )
    generator = torch.Generator().manual_seed(seed)
    vocoder = speech_weights(
        speech_weight_shapes(RAW_CONFIG["talker_config"], RAW_CONFIG["code2wav_config"]), seed + 1, 1.0
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("code2wav."):
                param.copy_(vocoder[name])
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "embed" in name or param.dim() == 1:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
        out_conv = model.code2wav.decoder[-1].conv
        scale = PRE_CLAMP_RMS / pre_clamp_rms(model, calibration_codes())
        out_conv.weight.mul_(scale)
        out_conv.bias.mul_(scale)
    return model.eval()


def calibration_codes(frames: int = 40, seed: int = 0) -> torch.Tensor:
    """A fixed random code sequence [1, 16, frames]."""
    return torch.randint(0, 2048, (1, 16, frames), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def pre_clamp_rms(model: Qwen3OmniMoeForConditionalGeneration, codes: torch.Tensor) -> float:
    """RMS of HF code2wav's output before its final clamp."""
    captured = []
    handle = model.code2wav.decoder[-1].register_forward_hook(lambda module, args, out: captured.append(out))
    model.code2wav(codes)
    handle.remove()
    return captured[0].pow(2).mean().sqrt().item()


def save_hf_omni(model: Qwen3OmniMoeForConditionalGeneration, path: Path) -> Path:
    """save_pretrained plus the embedded model's tokenizer files."""
    model.save_pretrained(path)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
    ):
        shutil.copy(default_model_path() / name, path / name)
    return path
