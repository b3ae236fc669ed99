"""Placeholder expansion: one pad token per media item → one pad per embedding row, and where each item's rows are.

Owns the audio token count, the audio-in-video V/A interleave of the prompt (whole, or live as the slices and the
audio arrive: `LiveInterleave`) and the special token ids. Pure
Python (no torch): it never looks at media or features, and it does not compute positions (see `mrope`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Modality = Literal["audio", "image", "video"]

AUDIO_TOKENS_PER_CHUNK = 13  # one 100-frame (1 s) chunk of the AuT encoder gives 13 tokens
AUDIO_CHUNK_FRAMES = 100  # 2 * n_window, with the checkpoint's n_window = 50


def audio_token_count(num_mel_frames: int) -> int:
    """Number of audio embeddings the AuT encoder makes from `num_mel_frames` valid mel frames (doc §3.7).

    Every full 100-frame chunk gives 13 tokens; the remainder r goes through three stride-2 convolutions,
    ceil(ceil(ceil(r/2)/2)/2) = ceil(r/8) tokens. Equals HF `_get_feat_extract_output_lengths(T, n_window=50)`.
    """
    if num_mel_frames < 0:
        raise ValueError(f"num_mel_frames must be >= 0, got {num_mel_frames}")
    full_chunks, rest = divmod(num_mel_frames, AUDIO_CHUNK_FRAMES)
    return AUDIO_TOKENS_PER_CHUNK * full_chunks + -(-rest // 8)


@dataclass(frozen=True)
class MultimodalTokenIds:
    """The special token ids that frame media in a prompt (take them from the checkpoint config)."""

    audio_pad: int
    image_pad: int
    video_pad: int
    audio_start: int
    audio_end: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_config(cls, config: Any) -> MultimodalTokenIds:
        """From any object or dict with the thinker config's `*_token_id` fields (ours, HF's or config.json)."""
        get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
        values = {}
        for ours, theirs in (
            ("audio_pad", "audio_token_id"),
            ("image_pad", "image_token_id"),
            ("video_pad", "video_token_id"),
            ("audio_start", "audio_start_token_id"),
            ("audio_end", "audio_end_token_id"),
            ("vision_start", "vision_start_token_id"),
            ("vision_end", "vision_end_token_id"),
        ):
            value = get(theirs)
            if value is None:
                raise ValueError(f"thinker config has no {theirs} (the HF class defaults are wrong or missing)")
            values[ours] = int(value)
        return cls(**values)


def _check_grid(grid_thw: Sequence[int], spatial_merge_size: int, what: str) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in grid_thw)
    if t < 1 or h < 1 or w < 1 or h % spatial_merge_size or w % spatial_merge_size:
        raise ValueError(f"{what} grid_thw {tuple(grid_thw)} is not a positive grid divisible by the merge size "
                         f"{spatial_merge_size} in h and w")
    return t, h, w


@dataclass(frozen=True)
class AudioItem:
    """A standalone audio clip: its number of valid mel frames (10 ms each)."""

    num_mel_frames: int

    def __post_init__(self) -> None:
        if self.num_mel_frames < 1:
            raise ValueError(f"an audio clip needs at least one mel frame, got {self.num_mel_frames}")

    @property
    def num_tokens(self) -> int:
        return audio_token_count(self.num_mel_frames)


@dataclass(frozen=True)
class ImageItem:
    """An image: its patch grid (t, h, w) before the 2x2 merge."""

    grid_thw: tuple[int, int, int]

    def num_tokens(self, spatial_merge_size: int = 2) -> int:
        t, h, w = _check_grid(self.grid_thw, spatial_merge_size, "image")
        return t * h * w // spatial_merge_size**2


@dataclass(frozen=True)
class VideoItem:
    """A video: patch grid, seconds per temporal grid step (temporal_patch_size / fps) and, when its soundtrack
    is used (use_audio_in_video), the soundtrack's valid mel frames."""

    grid_thw: tuple[int, int, int]
    second_per_grid: float
    audio_mel_frames: int | None = None

    def __post_init__(self) -> None:
        if self.audio_mel_frames is not None and self.audio_mel_frames < 1:
            raise ValueError(f"a video soundtrack needs at least one mel frame, got {self.audio_mel_frames}")

    @property
    def has_audio(self) -> bool:
        return self.audio_mel_frames is not None

    def num_video_tokens(self, spatial_merge_size: int = 2) -> int:
        t, h, w = _check_grid(self.grid_thw, spatial_merge_size, "video")
        return t * h * w // spatial_merge_size**2

    @property
    def num_audio_tokens(self) -> int:
        return audio_token_count(self.audio_mel_frames) if self.audio_mel_frames is not None else 0


MediaItem = AudioItem | ImageItem | VideoItem


def _modality(item: MediaItem) -> Modality:
    if isinstance(item, AudioItem):
        return "audio"
    if isinstance(item, ImageItem):
        return "image"
    if isinstance(item, VideoItem):
        return "video"
    raise TypeError(f"not a media item: {item!r}")


@dataclass(frozen=True)
class PlaceholderRange:
    """Where one item's embedding rows sit in the expanded token ids: [offset, offset + length).

    `item_index` counts items of the same modality in order of appearance. For a video with its audio the range
    is the interleaved pad block between `<|audio_start|>` and `<|audio_end|>`, and `is_video[i]` says whether row
    offset + i takes a vision-encoder row (True) or an audio-encoder row (False); it is None otherwise.
    """

    modality: Modality
    item_index: int
    offset: int
    length: int
    is_video: tuple[bool, ...] | None = field(default=None, repr=False)

    @property
    def video_rows(self) -> list[int]:
        """Absolute token indices holding vision embeddings (all of the range for a silent video)."""
        if self.is_video is None:
            return list(range(self.offset, self.offset + self.length)) if self.modality == "video" else []
        return [self.offset + i for i, v in enumerate(self.is_video) if v]

    @property
    def audio_rows(self) -> list[int]:
        """Absolute token indices holding audio embeddings (all of the range for an audio clip)."""
        if self.is_video is None:
            return list(range(self.offset, self.offset + self.length)) if self.modality == "audio" else []
        return [self.offset + i for i, v in enumerate(self.is_video) if not v]


def audio_video_interleave(
    grid_thw: Sequence[int],
    second_per_grid: float,
    num_audio_tokens: int,
    *,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 13.0,
) -> list[bool]:
    """Order of the pad tokens of a video with its audio, as HF's processor writes it (True = video pad).

    Each temporal slice (h*w/merge² pads) sits at time ti·second_per_grid·position_id_per_seconds, audio token k
    at k; pads go in time order and ties go to video. Computed in float64 like the processor (HF's
    `get_rope_index` merges in float32 after adding the start position; for second_per_grid values like 2/7 the
    two can disagree on a tie, see `mrope.MRopeBuilder.add_video_with_audio`).
    """
    t, h, w = _check_grid(grid_thw, spatial_merge_size, "video")
    per_slice = (h // spatial_merge_size) * (w // spatial_merge_size)
    order: list[bool] = []
    audio_done = 0
    for ti in range(t):
        slice_time = ti * second_per_grid * position_id_per_seconds
        audio_before = min(num_audio_tokens, max(audio_done, math.ceil(slice_time)))  # audio k < slice_time
        order += [False] * (audio_before - audio_done)
        audio_done = audio_before
        order += [True] * per_slice
    order += [False] * (num_audio_tokens - audio_done)
    return order


@dataclass(frozen=True)
class InterleaveRun:
    """A run of a live video's pad tokens whose place is final: temporal slice `slice_index` (video), or audio
    tokens [audio_start, audio_stop) of its soundtrack."""

    slice_index: int | None = None
    audio_start: int = 0
    audio_stop: int = 0

    @property
    def is_video(self) -> bool:
        return self.slice_index is not None


class LiveInterleave:
    """`audio_video_interleave` computed as a live video arrives: add temporal slices and audio tokens as they
    exist, `take()` the runs whose place in the token order is settled, `end()` when the video is over.

    Audio token k precedes slice i iff k < i·second_per_grid·position_id_per_seconds (ties go to video), so a
    slice waits for the audio before it, and audio waits until the next slice is known (or the video ended).
    The concatenated runs of a whole stream equal `audio_video_interleave` of the whole video, whatever the
    order and grouping in which slices and audio arrived. A video `with_audio=False` is a silent one.
    """

    def __init__(self, second_per_grid: float, with_audio: bool = True, position_id_per_seconds: float = 13.0) -> None:
        if not math.isfinite(second_per_grid) or second_per_grid <= 0:
            raise ValueError(f"second_per_grid must be a positive number, got {second_per_grid}")
        self.second_per_grid = float(second_per_grid)
        self.position_id_per_seconds = float(position_id_per_seconds)
        self.with_audio = with_audio
        self.num_slices = 0  # slices added
        self.num_audio_tokens = 0  # audio tokens added
        self.ended = False
        self._slices_out = 0
        self._audio_out = 0

    def add_slices(self, count: int = 1) -> None:
        self._check_open()
        if count < 0:
            raise ValueError(f"number of slices must be >= 0, got {count}")
        self.num_slices += count

    def add_audio(self, num_tokens: int) -> None:
        self._check_open()
        if num_tokens < 0:
            raise ValueError(f"number of audio tokens must be >= 0, got {num_tokens}")
        if num_tokens and not self.with_audio:
            raise ValueError("a silent live video takes no audio")
        self.num_audio_tokens += num_tokens

    def end(self) -> None:
        """No more slices or audio: everything added can be taken."""
        self.ended = True

    def take(self) -> list[InterleaveRun]:
        """The runs settled since the last call, in token order."""
        runs: list[InterleaveRun] = []
        audio_over = self.ended or not self.with_audio
        while True:
            before = math.ceil(self._slices_out * self.second_per_grid * self.position_id_per_seconds)
            slice_known = self._slices_out < self.num_slices
            audio_stop = min(before, self.num_audio_tokens) if slice_known or not self.ended else self.num_audio_tokens
            if audio_stop > self._audio_out:
                runs.append(InterleaveRun(audio_start=self._audio_out, audio_stop=audio_stop))
                self._audio_out = audio_stop
            if slice_known and (self._audio_out >= before or audio_over):
                runs.append(InterleaveRun(slice_index=self._slices_out))
                self._slices_out += 1
                continue
            return runs

    def _check_open(self) -> None:
        if self.ended:
            raise ValueError("the live video has ended")


def expand_placeholders(
    token_ids: Sequence[int],
    items: Sequence[MediaItem],
    token_ids_config: MultimodalTokenIds,
    *,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 13.0,
) -> tuple[list[int], list[PlaceholderRange]]:
    """Expand each single media pad token into the item's pad run; return the ids and one range per item.

    `token_ids` holds one `<|audio_pad|>` / `<|image_pad|>` / `<|video_pad|>` per media item, as the chat template
    renders them. `items` gives per-item info; the k-th pad of a modality belongs to the k-th item of that
    modality in `items` (the order across modalities does not matter). A video whose `audio_mel_frames` is set
    becomes `<|audio_start|>` + the V/A interleave + `<|audio_end|>` in place of its pad (so inside the rendered
    `<|vision_start|>…<|vision_end|>`), and its soundtrack has no `<|audio_pad|>` of its own, like HF's processor.
    Ranges come back in order of appearance. Raises ValueError when pads and items do not pair up.
    """
    ids = token_ids_config
    pad_modality: dict[int, Modality] = {ids.audio_pad: "audio", ids.image_pad: "image", ids.video_pad: "video"}
    by_modality: dict[Modality, list[MediaItem]] = {"audio": [], "image": [], "video": []}
    for item in items:
        by_modality[_modality(item)].append(item)
    pad_counts = {m: 0 for m in by_modality}
    for token in token_ids:
        if token in pad_modality:
            pad_counts[pad_modality[token]] += 1
    for modality, its_items in by_modality.items():
        if pad_counts[modality] != len(its_items):
            raise ValueError(f"{modality}: the prompt has {pad_counts[modality]} placeholder token(s) but "
                             f"{len(its_items)} {modality} item(s) were given")

    expanded: list[int] = []
    ranges: list[PlaceholderRange] = []
    next_index = {m: 0 for m in by_modality}
    for token in token_ids:
        modality = pad_modality.get(token)
        if modality is None:
            expanded.append(token)
            continue
        index = next_index[modality]
        next_index[modality] += 1
        item = by_modality[modality][index]
        if isinstance(item, VideoItem) and item.has_audio:
            order = audio_video_interleave(item.grid_thw, item.second_per_grid, item.num_audio_tokens,
                                           spatial_merge_size=spatial_merge_size,
                                           position_id_per_seconds=position_id_per_seconds)
            expanded.append(ids.audio_start)
            ranges.append(PlaceholderRange(modality, index, len(expanded), len(order), tuple(order)))
            expanded += [ids.video_pad if is_video else ids.audio_pad for is_video in order]
            expanded.append(ids.audio_end)
            continue
        if isinstance(item, AudioItem):
            length = item.num_tokens
        elif isinstance(item, ImageItem):
            length = item.num_tokens(spatial_merge_size)
        else:
            length = item.num_video_tokens(spatial_merge_size)
        ranges.append(PlaceholderRange(modality, index, len(expanded), length))
        expanded += [token] * length
    return expanded, ranges
