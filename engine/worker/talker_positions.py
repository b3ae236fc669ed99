"""The talker's M-RoPE positions for a prompt whose user turns hold images or video, as HF's `get_rope_index`
gives them over the talker's own token list (user-turn ids, then the assistant rows) with the talker's spatial
merge and position_id_per_seconds: images and videos take their 3-D grids (a video with its audio interleaved by
time), audio and text run on. Rows past the prompt decode at index + delta.
"""

from __future__ import annotations

import torch

from omnistream.engine.checkpoint.speech_config import SpeechConfig
from omnistream.multimodal.mrope import MRopeBuilder
from omnistream.scheduler import media_layout as kinds
from omnistream.scheduler.speech_outputs import NUM_ASSISTANT_ROWS, TalkerMedia


def talker_prompt_positions(
    config: SpeechConfig, num_user_rows: int, media: list[TalkerMedia]
) -> tuple[torch.Tensor, float]:
    """Positions [3, P] (float32) of the talker's prompt rows (`num_user_rows` user-turn rows with `media`
    among them, then the assistant rows) and its decode delta."""
    talker = config.talker
    builder = MRopeBuilder(
        spatial_merge_size=talker.spatial_merge_size, position_id_per_seconds=talker.position_id_per_seconds
    )
    parts: list[torch.Tensor] = []
    row, index = 0, 0  # row: the first user row not placed yet
    while index < len(media):
        opening = media[index].layout.num_opening_tokens
        parts.append(builder.add_text(media[index].row - opening - row))
        parts.append(builder.add_start(opening))
        end = media[index].row
        while index < len(media) and media[index].row == end:  # an item's pieces are adjacent; items never are
            parts.append(_add_content(builder, media[index]))
            end += media[index].length
            index += 1
        parts.append(builder.add_end(opening))
        row = end + opening
    parts.append(builder.add_text(num_user_rows - row + NUM_ASSISTANT_ROWS))
    return torch.cat(parts, dim=1), builder.delta()


def _add_content(builder: MRopeBuilder, piece: TalkerMedia) -> torch.Tensor:
    layout = piece.layout
    if layout.kind == kinds.AUDIO:
        return builder.add_audio(piece.length)
    if layout.kind == kinds.SOUNDTRACK:
        return builder.add_soundtrack(piece.length)
    if layout.kind == kinds.IMAGE:
        return builder.add_image(layout.grid_thw)
    if layout.kind == kinds.VIDEO:
        return builder.add_video(layout.grid_thw, layout.second_per_grid)
    if layout.kind == kinds.VIDEO_SLICE:
        return builder.add_video_slice(layout.slice_index, layout.grid_thw, layout.second_per_grid)
    if layout.kind != kinds.VIDEO_AUDIO:
        raise ValueError(f"unknown media layout {layout.kind!r}")
    t, h, w = layout.grid_thw  # the piece's rows are the video's and its soundtrack's
    num_video = t * h * w // builder.spatial_merge_size**2
    return builder.add_video_with_audio(layout.grid_thw, layout.second_per_grid, piece.length - num_video)[0]
