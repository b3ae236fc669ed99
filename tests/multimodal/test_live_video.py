"""Live frames: pairs of patches equal `preprocess_video` of the same frames; the frame clock refuses frames out
of order, missing or early with messages that say what was expected."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from omnistream.multimodal.errors import MediaError
from omnistream.multimodal.image import normalized_frame, patchify
from omnistream.multimodal.live_video import LiveFrames
from omnistream.multimodal.video import preprocess_video


def _frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("n, height, width", [(4, 64, 96), (5, 70, 100), (1, 300, 500)])
def test_pairs_equal_the_offline_video(n, height, width):
    frames = _frames(n, height, width)
    offline = preprocess_video(frames, 2.0)
    live = LiveFrames(2.0)
    pairs = [live.add(frame, 10.0 + i / 2) for i, frame in enumerate(frames)]
    pairs = [p for p in pairs if p is not None] + [p for p in [live.flush()] if p is not None]
    assert len(pairs) == offline.grid_thw[0]
    assert live.grid_thw == (1, *offline.grid_thw[1:]) and live.second_per_grid == offline.second_per_grid
    np.testing.assert_array_equal(np.concatenate(pairs), offline.pixel_values_videos)


def test_frames_take_the_first_frame_size_and_any_image_form():
    frames = _frames(2, 64, 96)
    live = LiveFrames(1.0)
    assert live.add(PIL.Image.fromarray(frames[0]), 0.0) is None
    resized = PIL.Image.fromarray(frames[1]).resize((200, 120))  # the camera changed resolution
    pair = live.add(resized, 1.0)
    offline = preprocess_video(frames, 1.0)
    assert live.grid_thw == (1, *offline.grid_thw[1:])
    height, width = live.size
    expected = patchify(np.stack([normalized_frame(PIL.Image.fromarray(frames[0]), height, width),
                                  normalized_frame(resized, height, width)]))
    np.testing.assert_array_equal(pair, expected)


def test_clock_errors_name_the_expected_frame():
    live = LiveFrames(2.0)
    frame = _frames(1, 64, 64)[0]
    live.add(frame, 3.0)
    live.add(frame, 3.52)  # jitter within half an interval is fine
    with pytest.raises(MediaError, match="out of order"):
        live.add(frame, 3.4)
    with pytest.raises(MediaError, match=r"missing frame.*frame 2 at 4\.000 s.*got 4\.600 s"):
        live.add(frame, 4.6)
    with pytest.raises(MediaError, match=r"too early.*frame 2 at 4\.000 s"):
        live.add(frame, 3.7)
    with pytest.raises(MediaError, match="finite"):
        live.add(frame, float("nan"))
    assert live.num_frames == 2  # refused frames change nothing
    assert live.add(frame, 4.0) is None and live.flush() is not None and live.flush() is None
    with pytest.raises(ValueError, match="fps"):
        LiveFrames(0.0)
