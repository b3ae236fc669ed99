"""HF transformers side of the parity tests: tiny thinker configs, seeded random models and reference logits."""

from __future__ import annotations

import copy

import torch
from transformers import (
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)

# doc §9 recipe scaled to the "tiny" preset; the token ids must be explicit (HF defaults are wrong or missing)
TINY = dict(
    text_config=dict(
        vocab_size=152064, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=65536, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[12, 10, 10],
                             interleaved=True, mrope_interleaved=True),
    ),
    vision_config=dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3, patch_size=16,
        temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=128, num_position_embeddings=2304,
        deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh",
    ),
    audio_config=dict(
        num_mel_bins=128, d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
        output_dim=128, downsample_hidden_size=8, n_window=50, n_window_infer=800, conv_chunksize=500,
        max_source_positions=1500, activation_function="gelu",
    ),
    audio_token_id=151675, image_token_id=151655, video_token_id=151656,
    audio_start_token_id=151669, audio_end_token_id=151670,
    vision_start_token_id=151652, vision_end_token_id=151653,
    position_id_per_seconds=13, seconds_per_chunk=2, user_token_id=872, tie_word_embeddings=False,
)


def head_dim_128_config() -> dict:
    """The real head_dim and M-RoPE sections ([24, 20, 20]) with the other dims small."""
    cfg = copy.deepcopy(TINY)
    text = cfg["text_config"]
    text.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    text["rope_parameters"]["mrope_section"] = [24, 20, 20]
    return cfg


def build_hf_thinker(cfg: dict, seed: int = 0) -> Qwen3OmniMoeThinkerForConditionalGeneration:
    """A float32 HF thinker with seeded weights scaled so activations and logits are O(1)."""
    model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(
        Qwen3OmniMoeThinkerConfig(**copy.deepcopy(cfg)),
        attn_implementation="sdpa",
        experts_implementation="eager",
        dtype=torch.float32,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name or param.dim() == 1:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)
    return model.eval()


@torch.no_grad()
def hf_logits(model: Qwen3OmniMoeThinkerForConditionalGeneration, token_ids: list[int]) -> torch.Tensor:
    """Logits [S, vocab] of one prompt; attention_mask makes HF use the M-RoPE position path (doc §10.1)."""
    input_ids = torch.tensor([token_ids])
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return out.logits[0].float()


def encoder_variant_config() -> dict:
    """TINY's text decoder with other encoder shapes: audio head_dim 64 (the real one), 3 layers; ViT head_dim 72
    (the real one), depth 4 and 3 DeepStack levels taken after blocks 0, 2 and 3."""
    cfg = copy.deepcopy(TINY)
    cfg["audio_config"].update(d_model=192, encoder_attention_heads=3, encoder_layers=3, encoder_ffn_dim=256,
                               downsample_hidden_size=16)
    cfg["vision_config"].update(hidden_size=144, num_heads=2, depth=4, intermediate_size=160,
                                deepstack_visual_indexes=[0, 2, 3])
    return cfg


@torch.no_grad()
def hf_audio_features(model: Qwen3OmniMoeThinkerForConditionalGeneration, features: torch.Tensor) -> torch.Tensor:
    """HF audio tower output [N_tok, out] for one clip of log-mel frames [128, T] (a batch of one, all frames valid)."""
    mask = torch.ones(1, features.shape[1], dtype=torch.long)
    out = model.get_audio_features(input_features=features[None], feature_attention_mask=mask)
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state


@torch.no_grad()
def hf_visual_features(
    model: Qwen3OmniMoeThinkerForConditionalGeneration, pixel_values: torch.Tensor, grid_thw: list, video: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF ViT output for all items: (merged tokens [N/4, out], one [N/4, out] tensor per DeepStack level)."""
    grid = torch.tensor(grid_thw)
    if video:
        out = model.get_video_features(pixel_values_videos=pixel_values, video_grid_thw=grid)
    else:
        out = model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid)
    return torch.cat(out.pooler_output), [torch.cat(level) for level in out.deepstack_features]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")


def save_servable(model: Qwen3OmniMoeThinkerForConditionalGeneration, path) -> str:
    """A thinker-only save plus the embedded model's tokenizer files: a checkpoint our engine can serve."""
    import shutil

    from omnistream.engine.checkpoint.default_model import default_model_path

    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_path() / name, path / name)
    return str(path)
