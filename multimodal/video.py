"""Video input: decode and sample frames (plus the soundtrack), and turn frames into ViT patches as HF's
Qwen2-VL video processor does with the checkpoint's values (doc §4.2).

The stream's declared frame size and duration are checked against their limits before anything is decoded,
and every frame's size again before it is converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import av
import numpy as np
import PIL.Image

from .audio import MAX_AUDIO_SECONDS, MediaFile, has_audio_stream, load_audio, open_container
from .errors import EmptyMediaError, MediaDecodeError, MediaError, MediaLimitError
from .image import (
    FACTOR,
    MAX_DECODED_PIXELS,
    PATCH,
    TEMPORAL_PATCH,
    check_pixels,
    normalized_frame,
    patchify,
    smart_resize,
    to_rgb,
)

VIDEO_MIN_PIXELS = 128 * 32 * 32  # the processor's per-frame size bounds (shortest/longest edge)
VIDEO_MAX_PIXELS = 768 * 32 * 32
MAX_VIDEO_SECONDS = 3600.0

VideoSource = Union[MediaFile, tuple]


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3]
    timestamps_s: list[float]  # time of each frame taken, from the start of the stream
    source_fps: float
    duration_s: float
    sample_fps: float  # frames taken per second of video: the fps the frames stand for
    audio: np.ndarray | None  # the soundtrack, float32 mono 16 kHz, or None


@dataclass(frozen=True)
class VideoInputs:
    pixel_values_videos: np.ndarray  # float32 [T/2 · gh · gw, 1536]
    grid_thw: tuple[int, int, int]  # (T/2, gh, gw)
    second_per_grid: float  # temporal_patch_size / fps of the frames

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w // 4


def num_sampled_frames(total_frames: int, source_fps: float, fps: float, min_frames: int, max_frames: int) -> int:
    """qwen-omni-utils' count: total/source_fps·fps, clamped to [min_frames, min(max_frames, total)],
    floored to a multiple of 2 (the temporal patch); a 1-frame video gives 1."""
    wanted = total_frames / source_fps * fps
    count = min(max(wanted, min_frames), max_frames, total_frames)
    return max(int(count // TEMPORAL_PATCH * TEMPORAL_PATCH), min(total_frames, 1))


def _sample(container: av.container.InputContainer, fps: float, min_frames: int, max_frames: int,
            max_pixels: int, max_seconds: float) -> tuple:
    stream = container.streams.video[0]
    check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels, "video")
    source_fps = float(stream.average_rate or stream.guessed_rate or 0)
    if stream.duration:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = (container.duration or 0) / av.time_base
    if duration > max_seconds:
        raise MediaLimitError("video", "duration in seconds", round(duration, 2), max_seconds)
    total = stream.frames or round(duration * source_fps)
    if total <= 0 or source_fps <= 0:
        raise EmptyMediaError("video: the stream declares no frames")
    count = num_sampled_frames(total, source_fps, fps, min_frames, max_frames)
    start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
    targets = list(np.linspace(0, total - 1, count).round() / source_fps)
    frames, times, previous = [], [], None
    for frame in container.decode(stream):  # nearest decoded frame to each target time
        check_pixels(frame.width, frame.height, max_pixels, "video")  # a header may lie; frames cannot
        t = float(frame.time) - start if frame.time is not None else 0.0
        while targets and targets[0] <= t:
            pick = previous if previous is not None and targets[0] - previous[0] < t - targets[0] else (t, frame)
            frames.append(pick[1].to_ndarray(format="rgb24"))
            times.append(pick[0])
            targets.pop(0)
        if not targets:
            break
        previous = (t, frame)
    if previous is not None:
        frames += [previous[1].to_ndarray(format="rgb24")] * len(targets)
        times += [previous[0]] * len(targets)
    if not frames:
        raise EmptyMediaError("video: the stream decodes to zero frames")
    return np.stack(frames), times, source_fps, duration, count / total * source_fps


def load_video(
    source: VideoSource, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768, with_audio: bool = True,
    max_pixels: int = MAX_DECODED_PIXELS, max_seconds: float = MAX_VIDEO_SECONDS,
    max_audio_seconds: float = MAX_AUDIO_SECONDS,
) -> DecodedVideo:
    """Decode a video file (path, bytes, file-like) sampling about `fps` frames per second, with its soundtrack.

    An already-decoded `(frames uint8 [T,H,W,3], fps)` or `(list of PIL images, fps)` is taken as is (no sampling);
    a third element, anything `load_audio` takes (e.g. `(samples, sample_rate)`), is its soundtrack. A file
    whose frames have more than `max_pixels` or that lasts more than `max_seconds` is a MediaLimitError (its
    soundtrack: more than `max_audio_seconds`).
    """
    if isinstance(source, tuple):
        if len(source) not in (2, 3):
            raise MediaError("video: a decoded video is (frames, fps) or (frames, fps, soundtrack)")
        return _from_frames(*source, max_audio_seconds=max_audio_seconds)
    with open_container(source, "video") as container:
        if not container.streams.video:
            raise EmptyMediaError("video: the file has no video stream")
        try:
            frames, times, source_fps, duration, sample_fps = _sample(container, fps, min_frames, max_frames,
                                                                      max_pixels, max_seconds)
        except av.FFmpegError as exc:
            raise MediaDecodeError(f"video: corrupt or truncated data ({exc})") from exc
    audio = None
    if with_audio and has_audio_stream(source):
        audio = load_audio(source, max_seconds=max_audio_seconds)
    return DecodedVideo(frames, times, source_fps, duration, sample_fps, audio)


def _from_frames(frames: np.ndarray | list, fps: float, soundtrack: object = None, *,
                 max_audio_seconds: float) -> DecodedVideo:
    if isinstance(frames, list):
        frames = np.stack([np.asarray(to_rgb(f)) if isinstance(f, PIL.Image.Image) else f for f in frames])
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise MediaError(f"video: frames must be uint8 [T, H, W, 3], got {frames.shape} {frames.dtype}")
    if len(frames) == 0:
        raise EmptyMediaError("video: zero frames")
    times = [i / fps for i in range(len(frames))]
    audio = None if soundtrack is None else load_audio(soundtrack, max_seconds=max_audio_seconds)
    return DecodedVideo(frames, times, float(fps), len(frames) / fps, float(fps), audio)


def preprocess_video(
    frames: np.ndarray, fps_of_frames: float, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS
) -> VideoInputs:
    """uint8 [T, H, W, 3] frames → patches; an odd count repeats the last frame; 2/fps seconds per grid step."""
    if len(frames) == 0:
        raise EmptyMediaError("video: zero frames")
    height, width = smart_resize(frames.shape[1], frames.shape[2], FACTOR, min_pixels, max_pixels)
    if len(frames) % TEMPORAL_PATCH:
        frames = np.concatenate([frames, frames[-1:]])
    normalized = np.stack([normalized_frame(PIL.Image.fromarray(f), height, width) for f in frames])
    grid = (len(frames) // TEMPORAL_PATCH, height // PATCH, width // PATCH)
    return VideoInputs(patchify(normalized), grid, TEMPORAL_PATCH / fps_of_frames)
