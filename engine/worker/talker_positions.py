"""The talker's M-RoPE positions for a prompt whose user turns hold media, as HF's `get_rope_index` gives them
over the talker's own token list (user-turn ids, then the assistant rows) with the talker's spatial merge and
position_id_per_seconds: images take their 3-D grid, audio and text run on. Rows past the prompt decode at
index + delta."""

from __future__ import annotations

import torch

from omnistream.engine.checkpoint.speech_config import SpeechConfig
from omnistream.multimodal.mrope import MRopeBuilder
from omnistream.multimodal.tensor_codec import from_tensor_data
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.speech import user_turn_positions
from omnistream.scheduler.speech_outputs import NUM_ASSISTANT_ROWS


def talker_prompt_positions(
    config: SpeechConfig, token_ids: list[int], features: list[MultiModalFeature]
) -> tuple[torch.Tensor, float]:
    """Positions [3, P] (float32) of the talker's prompt rows and its decode delta. `features` are the thinker
    prompt's media with their encoder inputs (image grids); only audio and images may sit in user turns."""
    talker = config.talker
    builder = MRopeBuilder(
        spatial_merge_size=talker.spatial_merge_size, position_id_per_seconds=talker.position_id_per_seconds
    )
    kept = user_turn_positions(token_ids, config.im_start_token_id, config.user_token_id)
    starting = {feature.offset: feature for feature in features}
    parts: list[torch.Tensor] = []
    text, index = 0, 0
    while index < len(kept):
        feature = starting.get(kept[index] + 1)  # kept[index] is the item's opening token
        if feature is None:
            text, index = text + 1, index + 1
            continue
        if text:
            parts.append(builder.add_text(text))
        parts.append(builder.add_start(1))
        index += 1
        while feature is not None:  # an item may come as several features over adjacent placeholders
            if feature.modality == "image":
                grid = from_tensor_data(feature.inputs["grid_thw"]).reshape(-1).tolist()
                parts.append(builder.add_image(grid))
            else:
                parts.append(builder.add_audio(feature.length))
            index += feature.length
            feature = starting.get(feature.end)
        parts.append(builder.add_end(1))
        text, index = 0, index + 1
    parts.append(builder.add_text(text + NUM_ASSISTANT_ROWS))
    positions = torch.cat(parts, dim=1)
    return positions, builder.delta()
