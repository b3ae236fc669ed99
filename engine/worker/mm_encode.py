"""Runs the encoders for one media item and shapes the result as rows for its placeholder span (or, for a piece
of a split item, for the whole item: the runner takes the piece's rows from `row_offset`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnistream.multimodal.tensor_codec import from_tensor_data
from omnistream.scheduler.mm_feature import MultiModalFeature


@dataclass
class EncoderOutput:
    embeds: torch.Tensor  # [length, hidden]: one row per placeholder position of the item
    deepstack: torch.Tensor | None  # [levels, length, hidden] for visual items (zero rows at audio positions)


def _visual(
    model: torch.nn.Module, feature: MultiModalFeature, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = from_tensor_data(feature.inputs["pixel_values"]).to(device)
    grid = from_tensor_data(feature.inputs["grid_thw"]).reshape(-1, 3).tolist()
    return model.embed_visual(pixels, grid)


def _audio(model: torch.nn.Module, feature: MultiModalFeature, device: torch.device) -> torch.Tensor:
    mel = from_tensor_data(feature.inputs["input_features"]).to(device)
    window = feature.options.get("window_frames")
    part = bool(feature.options.get("part_of_longer_clip", False))
    return model.embed_audio([mel], None if window is None else int(window), part)[0]


def encode_feature(model: torch.nn.Module, feature: MultiModalFeature, device: torch.device) -> EncoderOutput:
    """Encoder output rows for `feature`, checked against its placeholder count."""
    if feature.modality == "audio":
        result = EncoderOutput(_audio(model, feature, device), None)
    elif feature.modality in ("image", "video"):
        result = EncoderOutput(*_visual(model, feature, device))
    elif feature.modality == "video_audio":
        video, deepstack = _visual(model, feature, device)
        audio = _audio(model, feature, device)
        is_video = from_tensor_data(feature.inputs["video_mask"]).to(device=device, dtype=torch.bool)
        embeds = video.new_empty(feature.length, video.shape[-1])
        embeds[is_video], embeds[~is_video] = video, audio.to(video.dtype)
        full_deepstack = deepstack.new_zeros(deepstack.shape[0], feature.length, deepstack.shape[-1])
        full_deepstack[:, is_video] = deepstack
        result = EncoderOutput(embeds, full_deepstack)
    else:
        raise ValueError(f"unknown media modality {feature.modality!r}")
    if result.embeds.shape[0] != feature.num_encoder_rows:
        raise ValueError(
            f"{feature.modality} item {feature.identifier[:12]} encoded to {result.embeds.shape[0]} rows "
            f"but expects {feature.num_encoder_rows}"
        )
    return result
