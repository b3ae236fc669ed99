import io

import numpy as np
import PIL.Image
import pytest

from omnistream.multimodal.errors import EmptyMediaError, MediaDecodeError, MediaError
from omnistream.multimodal.image import normalized_frame, preprocess_image
from omnistream.multimodal.video import load_video, num_sampled_frames, preprocess_video
from tests.multimodal.media import encode_video


def test_samples_at_2fps_with_soundtrack():
    video = load_video(encode_video(seconds=2.0, fps=10))  # 20 frames, gray level 10·i
    assert video.source_fps == 10 and abs(video.duration_s - 2.0) < 0.05
    assert video.frames.shape == (4, 64, 64, 3) and video.frames.dtype == np.uint8
    taken = np.round(video.frames.reshape(4, -1).mean(1) / 10).astype(int)
    np.testing.assert_array_equal(taken, [0, 6, 13, 19])  # linspace(0, 19, 4).round()
    np.testing.assert_allclose(video.timestamps_s, [0.0, 0.6, 1.3, 1.9], atol=1e-6)
    assert video.sample_fps == pytest.approx(2.0)
    assert video.audio is not None and abs(video.audio.size - 32000) <= 80


def test_no_audio_and_file_like():
    data = encode_video(seconds=1.0, fps=10, with_audio=False)
    video = load_video(io.BytesIO(data), fps=2.0)
    assert video.audio is None and len(video.frames) == 4  # min_frames


def test_corrupt_and_garbage():
    data = encode_video()
    with pytest.raises((MediaDecodeError, EmptyMediaError)):
        load_video(data[: len(data) // 3])
    with pytest.raises(MediaDecodeError):
        load_video(b"\x00garbage" * 200)


def test_frame_count_rule():
    assert num_sampled_frames(300, 30.0, 2.0, 4, 768) == 20
    assert num_sampled_frames(31, 30.0, 2.0, 4, 768) == 4  # min_frames
    assert num_sampled_frames(10_000, 1.0, 2.0, 4, 768) == 768
    assert num_sampled_frames(3, 30.0, 2.0, 4, 768) == 2  # capped by the frames there are, even
    assert num_sampled_frames(1, 30.0, 2.0, 4, 768) == 1


def hand_patches(frames: np.ndarray) -> np.ndarray:
    """Doc §4.2 written as loops: rows t, block row, block col, (row, col) in block; vector (C, T, 16, 16)."""
    t_len, _, h, w = frames.shape
    rows = []
    for t in range(t_len // 2):
        for bh in range(h // 32):
            for bw in range(w // 32):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (2 * bh + mh) * 16, (2 * bw + mw) * 16
                        patch = frames[2 * t : 2 * t + 2, :, y : y + 16, x : x + 16]  # [T, C, 16, 16]
                        rows.append(patch.transpose(1, 0, 2, 3).reshape(-1))
    return np.stack(rows)


def test_patch_layout_and_odd_frame_count():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    out = preprocess_video(frames, fps_of_frames=2.0, min_pixels=64 * 96, max_pixels=64 * 96)
    assert out.grid_thw == (2, 4, 6) and out.second_per_grid == 1.0 and out.num_tokens == 12
    padded = np.stack([normalized_frame(PIL.Image.fromarray(f), 64, 96) for f in [*frames, frames[-1]]])
    np.testing.assert_array_equal(out.pixel_values_videos, hand_patches(padded))
    assert preprocess_video(frames[:2], fps_of_frames=1.0, min_pixels=64 * 96, max_pixels=64 * 96).second_per_grid == 2.0


def test_two_frame_video_equals_image():
    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    video = preprocess_video(np.stack([image, image]), 2.0, min_pixels=64 * 96, max_pixels=64 * 96)
    np.testing.assert_array_equal(video.pixel_values_videos, preprocess_image(image).pixel_values)


def test_decoded_inputs():
    frames = np.zeros((5, 32, 32, 3), np.uint8)
    video = load_video((frames, 5.0))
    assert video.timestamps_s == [0.0, 0.2, 0.4, 0.6, 0.8] and video.audio is None
    images = [PIL.Image.new("RGBA", (32, 32)) for _ in range(2)]
    assert load_video((images, 2.0)).frames.shape == (2, 32, 32, 3)


def test_decoded_frames_with_a_soundtrack():
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    wave = np.sin(np.arange(8000) / 7).astype(np.float32)
    video = load_video((frames, 2.0, (wave, 8000)))
    assert video.audio.shape == (16000,) and video.audio.dtype == np.float32  # resampled to 16 kHz
    with pytest.raises(MediaError, match="frames, fps"):
        load_video((frames,))
