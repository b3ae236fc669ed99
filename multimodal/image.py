"""Image input: load to RGB and turn into ViT patches exactly as HF `Qwen2VLImageProcessorPil` (checkpoint values).

Rows of `pixel_values` are in spatial-merge-block order; each row is (C, T=2, 16, 16) flattened.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from .errors import MediaDecodeError, MediaError, MediaLimitError, MediaTooSmallError

PATCH = 16
MERGE = 2
TEMPORAL_PATCH = 2
FACTOR = PATCH * MERGE  # 32
MIN_PIXELS = 3136
MAX_PIXELS = 12_845_056
MAX_ASPECT_RATIO = 200
MEAN = STD = 0.5
MAX_DECODED_PIXELS = 64_000_000  # of an image (or a video frame) as encoded, checked from its header
PIL.Image.MAX_IMAGE_PIXELS = MAX_DECODED_PIXELS  # PIL's own bomb guard (it refuses twice this on open) for any
# path that opens an image without asking load_image

ImageSource = Union[str, Path, bytes, bytearray, memoryview, BinaryIO, PIL.Image.Image, np.ndarray]


@dataclass(frozen=True)
class ImageInputs:
    pixel_values: np.ndarray  # float32 [gh·gw, 1536]
    grid_thw: tuple[int, int, int]  # (1, gh, gw) in 16-pixel patches

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens after the 2×2 merge."""
        return self.grid_thw[1] * self.grid_thw[2] // (MERGE * MERGE)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, with transparency composited on white (as HF does)."""
    if "A" in image.getbands() or "transparency" in image.info:
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def check_pixels(width: int, height: int, max_pixels: int, modality: str = "image") -> None:
    """MediaLimitError if a `width`×`height` picture has more than `max_pixels` pixels (said before decoding)."""
    if width * height > max_pixels:
        raise MediaLimitError(modality, f"pixel count of {width}x{height}", width * height, max_pixels)


def load_image(source: ImageSource, max_pixels: int = MAX_DECODED_PIXELS) -> PIL.Image.Image:
    """An RGB PIL image from a path, encoded bytes, a file-like, a PIL image or an HWC uint8 array.

    EXIF orientation is applied for encoded files; alpha is composited on white. An image of more than
    `max_pixels` is a MediaLimitError, for encoded files from the size in their header, before decoding.
    """
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] not in (3, 4) or source.dtype != np.uint8:
            raise MediaError(f"image: arrays must be HWC uint8 with 3 or 4 channels, got {source.shape} {source.dtype}")
        check_pixels(source.shape[1], source.shape[0], max_pixels)
        return to_rgb(PIL.Image.fromarray(source))
    if isinstance(source, PIL.Image.Image):
        check_pixels(*source.size, max_pixels)
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        with PIL.Image.open(source) as image:
            check_pixels(*image.size, max_pixels)  # PIL has read the header only
            image.load()
            return to_rgb(PIL.ImageOps.exif_transpose(image))
    except PIL.Image.DecompressionBombError as exc:
        raise MediaLimitError("image", "pixel count", "too large", max_pixels) from exc
    except MediaError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaDecodeError(f"image: cannot decode the file ({exc})") from exc


def smart_resize(
    height: int, width: int, factor: int = FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2-VL target size: multiples of `factor`, pixel count within bounds, aspect ratio kept (doc §4.1)."""
    if min(height, width) < 1:
        raise MediaTooSmallError(f"image: size {height}x{width} has no pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaLimitError("image", "aspect ratio", round(ratio, 2), MAX_ASPECT_RATIO)
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def normalized_frame(image: PIL.Image.Image, height: int, width: int) -> np.ndarray:
    """Bicubic resize to (height, width), rescale by 1/255, normalise with mean = std = 0.5: float32 [3, H, W]."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
    pixels = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return ((pixels - np.float32(MEAN)) / np.float32(STD)).transpose(2, 0, 1)


def patchify(frames: np.ndarray) -> np.ndarray:
    """[F, 3, H, W] (F a multiple of 2) → [F/2 · H/16 · W/16, 1536], rows in merge-block order (doc §4.2)."""
    f, c, h, w = frames.shape
    gt, gh, gw = f // TEMPORAL_PATCH, h // PATCH, w // PATCH
    blocks = frames.reshape(gt, TEMPORAL_PATCH, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    # → (t, block row, block col, row in block, col in block, C, T, ph, pw)
    blocks = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(blocks).reshape(gt * gh * gw, c * TEMPORAL_PATCH * PATCH * PATCH)


def preprocess_image(
    image: ImageSource, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
    max_decoded_pixels: int = MAX_DECODED_PIXELS,
) -> ImageInputs:
    """Resize, normalise and patchify one image; the frame is repeated to fill the temporal patch of 2.
    `max_decoded_pixels` bounds the image as given (load_image), `min/max_pixels` the resized one."""
    image = load_image(image, max_decoded_pixels)
    height, width = smart_resize(image.height, image.width, FACTOR, min_pixels, max_pixels)
    frame = normalized_frame(image, height, width)
    pixel_values = patchify(np.broadcast_to(frame, (TEMPORAL_PATCH, *frame.shape)))
    return ImageInputs(pixel_values=pixel_values, grid_thw=(1, height // PATCH, width // PATCH))
