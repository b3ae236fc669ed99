"""Where a media feature's rows lie in M-RoPE terms (torch-free): what, beyond the token ids, rebuilds their
positions in another sequence (the talker's prompt): an image's grid, a video's grid and seconds per temporal
patch, a live video's slice index. Front ends write it into MultiModalFeature.options; `layout_of` reads it back.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from omnistream.scheduler.mm_feature import MultiModalFeature

AUDIO = "audio"  # a clip (or one window of it): consecutive positions
IMAGE = "image"
VIDEO = "video"  # a whole silent video
VIDEO_AUDIO = "video_audio"  # a whole video interleaved with its soundtrack
VIDEO_SLICE = "video_slice"  # one temporal patch of a live video
SOUNDTRACK = "soundtrack"  # a run of a live video's audio between its slices

Options = dict[str, int | float | bool]


class MediaLayout(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    kind: str
    grid_thw: tuple[int, int, int] = (0, 0, 0)  # image and video kinds (a slice's t is 1)
    second_per_grid: float = 0.0  # video kinds
    slice_index: int = 0  # VIDEO_SLICE: its temporal index in the video
    with_audio: bool = False  # VIDEO_SLICE: the live video carries its soundtrack

    @property
    def num_opening_tokens(self) -> int:
        """<|audio_start|>, <|vision_start|>, or both for a video with its audio (closing tokens likewise)."""
        return 2 if self.kind in (VIDEO_AUDIO, SOUNDTRACK) or self.with_audio else 1


def image_options(grid_thw: Sequence[int]) -> Options:
    t, h, w = (int(x) for x in grid_thw)
    return {"grid_t": t, "grid_h": h, "grid_w": w}


def video_options(grid_thw: Sequence[int], second_per_grid: float) -> Options:
    return {**image_options(grid_thw), "second_per_grid": float(second_per_grid)}


def video_slice_options(index: int, grid_thw: Sequence[int], second_per_grid: float, with_audio: bool) -> Options:
    return {**video_options(grid_thw, second_per_grid), "slice_index": int(index), "with_audio": bool(with_audio)}


SOUNDTRACK_OPTIONS: Options = {"soundtrack": True}


def layout_of(feature: MultiModalFeature) -> MediaLayout:
    """The feature's layout; ValueError naming the feature when its options lack what its modality needs."""
    options = feature.options
    if feature.modality == "audio":
        return MediaLayout(kind=SOUNDTRACK if options.get("soundtrack") else AUDIO)
    if feature.modality not in ("image", "video", "video_audio"):
        raise ValueError(f"media feature {feature.identifier[:12]}: unknown modality {feature.modality!r}")
    try:
        grid = (int(options["grid_t"]), int(options["grid_h"]), int(options["grid_w"]))
        if feature.modality == "image":
            return MediaLayout(kind=IMAGE, grid_thw=grid)
        second_per_grid = float(options["second_per_grid"])
    except KeyError as missing:
        raise ValueError(
            f"media feature {feature.identifier[:12]} ({feature.modality}) has no layout: option {missing} is not set"
        ) from None
    if feature.modality == "video_audio":
        return MediaLayout(kind=VIDEO_AUDIO, grid_thw=grid, second_per_grid=second_per_grid)
    if "slice_index" in options:
        return MediaLayout(
            kind=VIDEO_SLICE,
            grid_thw=grid,
            second_per_grid=second_per_grid,
            slice_index=int(options["slice_index"]),
            with_audio=bool(options.get("with_audio", False)),
        )
    return MediaLayout(kind=VIDEO, grid_thw=grid, second_per_grid=second_per_grid)
