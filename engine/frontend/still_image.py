"""A still image in a live session's user turn: the tokens, TM-RoPE positions and media feature that the offline
input processor makes for an image part (`<|vision_start|><|image_pad|>…<|vision_end|>`) at that place.

Nothing here is a second image pipeline: the pixels come from `preprocess_image` (the offline resize, pixel budget
and patch order), the positions from the session's running `MRopeBuilder` (the builder offline prompts are scanned
with), and the feature has the offline identifier, inputs and layout, so the encoder and its cache treat it as the
same image.
"""

from __future__ import annotations

import numpy as np
import torch

from omnistream.multimodal.hashing import hash_media
from omnistream.multimodal.image import ImageInputs
from omnistream.multimodal.mrope import MRopeBuilder
from omnistream.multimodal.placeholders import MultimodalTokenIds
from omnistream.multimodal.tensor_codec import to_tensor_data
from omnistream.scheduler.media_layout import image_options
from omnistream.scheduler.mm_feature import MultiModalFeature


def still_image_input(
    image: ImageInputs, positions: MRopeBuilder, ids: MultimodalTokenIds
) -> tuple[list[int], torch.Tensor, MultiModalFeature]:
    """The image's tokens (vision start, one pad per merged patch, vision end), their positions (added to
    `positions`, which must stand where the image goes) and its media feature, at the builder's token offset."""
    pixels = torch.from_numpy(np.ascontiguousarray(image.pixel_values))
    grid = torch.tensor([image.grid_thw], dtype=torch.int64)
    first_pad = positions.num_tokens + 1
    rows = torch.cat([positions.add_start(1), positions.add_image(image.grid_thw), positions.add_end(1)], dim=1)
    feature = MultiModalFeature(
        modality="image",
        identifier=hash_media("image", pixels, grid),
        offset=first_pad,
        length=image.num_tokens,
        inputs={"pixel_values": to_tensor_data(pixels), "grid_thw": to_tensor_data(grid)},
        options=image_options(image.grid_thw),
    )
    tokens = [ids.vision_start, *[ids.image_pad] * image.num_tokens, ids.vision_end]
    return tokens, rows, feature
