"""A medium past its limit is refused from what its header declares, before it is decoded: an image's width ×
height, a video's frame size and duration, an audio file's duration (and, if the header lies, as soon as
decoding passes the limit); raw PCM rates are bounded. Each refusal is a MediaLimitError naming the limit."""

import time

import numpy as np
import pytest

from omnistream.multimodal.audio import check_sample_rate, load_audio
from omnistream.multimodal.errors import MediaError, MediaLimitError
from omnistream.multimodal.image import load_image
from omnistream.multimodal.video import load_video
from tests.multimodal.media import encode_video, forged_png, pcm16_wav


def test_an_image_larger_than_the_pixel_limit_is_refused_from_its_header():
    with pytest.raises(MediaLimitError, match="pixel count of 9000x9000 is 81000000, above the limit of 64000000"):
        load_image(forged_png(9000, 9000))  # decoding would fail: the size came from the header
    with pytest.raises(MediaLimitError, match="pixel count of 8x8"):
        load_image(forged_png(8, 8), max_pixels=63)
    with pytest.raises(MediaLimitError, match="pixel count of 30x20"):
        load_image(np.zeros((20, 30, 3), np.uint8), max_pixels=599)
    assert load_image(np.zeros((20, 30, 3), np.uint8), max_pixels=600).size == (30, 20)


def test_a_video_is_refused_from_its_declared_frame_size_and_duration():
    data = encode_video(seconds=2.0, fps=10, size=64, with_audio=True)
    with pytest.raises(MediaLimitError, match="video: pixel count of 64x64 is 4096, above the limit of 4095"):
        load_video(data, max_pixels=4095)
    with pytest.raises(MediaLimitError, match="video: duration in seconds is 2.0, above the limit of 1.5"):
        load_video(data, max_seconds=1.5)
    with pytest.raises(MediaLimitError, match="audio: duration in seconds"):
        load_video(data, max_audio_seconds=1.0)
    assert len(load_video(data, max_pixels=4096, max_seconds=2.0).frames) == 4


def test_audio_is_refused_from_its_declared_duration_before_it_is_decoded():
    start = time.perf_counter()
    with pytest.raises(MediaLimitError, match="audio: duration in seconds is 8000.0, above the limit of 3600.0"):
        load_audio(pcm16_wav(8000, rate=1))  # 16 KB that would decode to 8000 s (512 MB) at 16 kHz
    assert time.perf_counter() - start < 1.0
    with pytest.raises(MediaLimitError, match="duration in seconds is 3.0, above the limit of 2"):
        load_audio(pcm16_wav(48_000, rate=16_000), max_seconds=2)
    assert len(load_audio(pcm16_wav(48_000, rate=16_000), max_seconds=3)) == 48_000


def test_raw_pcm_needs_a_sample_rate_within_bounds_and_a_duration_within_the_limit():
    for rate in (1, 7_999, 192_001, 16_000.0, True):
        with pytest.raises(MediaError, match="sample_rate must be a whole number of Hz from 8000 to 192000"):
            load_audio((np.zeros(100, np.float32), rate))
    assert check_sample_rate(np.int64(8_000)) == 8_000
    with pytest.raises(MediaLimitError, match="duration in seconds is 5.0"):
        load_audio((np.zeros(80_000, np.float32), 16_000), max_seconds=4)
