import io

import numpy as np
import PIL.Image
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from omnistream.multimodal.errors import MediaDecodeError, MediaLimitError
from omnistream.multimodal.image import MAX_PIXELS, MIN_PIXELS, load_image, preprocess_image, smart_resize

HF = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                              image_std=[0.5] * 3, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("height,width", [(64, 96), (448, 448), (70, 100), (33, 517), (300, 20), (1, 1)])
def test_matches_hf_pil_processor(height, width):
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ref = HF(PIL.Image.fromarray(pixels), return_tensors="np")
    ours = preprocess_image(pixels)
    assert ours.grid_thw == tuple(ref["image_grid_thw"][0])
    assert ours.pixel_values.dtype == np.float32
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() <= 1e-6
    assert ours.num_tokens == ours.grid_thw[1] * ours.grid_thw[2] // 4


def test_smart_resize_bounds():
    assert smart_resize(70, 100) == (64, 96)
    assert smart_resize(10, 10) == (64, 64)
    h, w = smart_resize(8000, 6000)
    assert h % 32 == 0 and w % 32 == 0 and h * w <= MAX_PIXELS
    with pytest.raises(MediaLimitError, match="aspect ratio"):
        smart_resize(10, 2010)


def test_load_image_sources(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black → white
    assert np.all(np.asarray(load_image(rgba)) == 255)
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (3, 2), (10, 20, 30)).save(buffer, format="PNG")
    path = tmp_path / "a.png"
    path.write_bytes(buffer.getvalue())
    for source in (buffer.getvalue(), path, str(path), io.BytesIO(buffer.getvalue())):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (3, 2) and image.getpixel((0, 0)) == (10, 20, 30)


def test_exif_orientation():
    image = PIL.Image.new("RGB", (4, 2))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90°
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (2, 4)


def test_garbage_bytes():
    with pytest.raises(MediaDecodeError):
        load_image(b"not an image" * 10)
