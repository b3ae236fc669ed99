"""Camera frames of a live video segment: checked against the segment's frame clock, resized to one size and
turned into ViT patches one temporal pair at a time, exactly as `video.preprocess_video` does for a whole video.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import MediaError
from .image import FACTOR, PATCH, TEMPORAL_PATCH, ImageSource, load_image, normalized_frame, patchify, smart_resize
from .video import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS


class LiveFrames:
    """Frames in (with timestamps), temporal pairs of patches out: rows [h/16 · w/16, 1536], grid (1, h/16, w/16).

    The clock: the first frame is time t0; frame n must carry timestamp t0 + n/fps, give or take half a frame
    interval. A frame that goes back in time, skips a slot (a missing frame) or comes a slot early is refused
    with a MediaError (a ValueError) naming the expected time. Every frame is resized to the size that
    `smart_resize` (video pixel bounds) picks for the first frame.
    """

    def __init__(self, fps: float, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS) -> None:
        if not math.isfinite(fps) or not 0 < fps <= 60:
            raise ValueError(f"video fps must be in (0, 60], got {fps}")
        self.fps = float(fps)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.size: tuple[int, int] | None = None  # (height, width) every frame is resized to
        self.num_frames = 0
        self.first_timestamp: float | None = None
        self._last_timestamp: float | None = None
        self._pending: np.ndarray | None = None  # the first frame of an incomplete pair, normalised [3, H, W]

    @property
    def second_per_grid(self) -> float:
        """Seconds one temporal pair stands for: temporal_patch_size / fps, as for an offline video."""
        return TEMPORAL_PATCH / self.fps

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """Patch grid of one pair."""
        if self.size is None:
            raise ValueError("no frame yet")
        return (1, self.size[0] // PATCH, self.size[1] // PATCH)

    def check_timestamp(self, timestamp_s: float) -> None:
        """Raise MediaError (a ValueError) unless `timestamp_s` is the next frame's slot of the clock."""
        if not isinstance(timestamp_s, (int, float)) or not math.isfinite(timestamp_s):
            raise MediaError(f"video: frame timestamp must be a finite number of seconds, got {timestamp_s!r}")
        if self.first_timestamp is None:
            return
        interval = 1 / self.fps
        expected = self.first_timestamp + self.num_frames * interval
        if timestamp_s <= self._last_timestamp:
            raise MediaError(
                f"video: frame timestamps out of order: {timestamp_s:.3f} s after {self._last_timestamp:.3f} s")
        if timestamp_s > expected + interval / 2:
            missing = round((timestamp_s - expected) * self.fps)
            raise MediaError(
                f"video: missing frame(s): expected frame {self.num_frames} at {expected:.3f} s (one every "
                f"{interval:.3f} s at {self.fps:g} fps), got {timestamp_s:.3f} s, about {missing} frame(s) late; "
                f"send every frame (repeat the last one to fill a gap)")
        if timestamp_s < expected - interval / 2:
            raise MediaError(
                f"video: frame too early: expected frame {self.num_frames} at {expected:.3f} s (one every "
                f"{interval:.3f} s at {self.fps:g} fps), got {timestamp_s:.3f} s; send frames at {self.fps:g} fps")

    def add(self, image: ImageSource, timestamp_s: float) -> np.ndarray | None:
        """Check, resize and normalise a frame; the pair's patch rows when it completes one, else None."""
        self.check_timestamp(timestamp_s)
        picture = load_image(image)
        if self.size is None:
            self.size = smart_resize(picture.height, picture.width, FACTOR, self.min_pixels, self.max_pixels)
        frame = normalized_frame(picture, *self.size)
        if self.first_timestamp is None:
            self.first_timestamp = float(timestamp_s)
        self._last_timestamp = float(timestamp_s)
        self.num_frames += 1
        if self._pending is None:
            self._pending = frame
            return None
        pair, self._pending = np.stack([self._pending, frame]), None
        return patchify(pair)

    def flush(self) -> np.ndarray | None:
        """End of the segment: an odd last frame is repeated to fill its pair (as offline); else None."""
        if self._pending is None:
            return None
        pair, self._pending = np.stack([self._pending, self._pending]), None
        return patchify(pair)
