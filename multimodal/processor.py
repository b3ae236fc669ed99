"""The input processor: a prompt and its media become expanded token ids, scheduler media items and M-RoPE ids.

Each item is loaded and preprocessed (audio → log-mel, images and videos → patches), placeholders are
expanded, TM-RoPE positions computed, and every audio clip is cut into its attention windows so that
a long recording is encoded window by window (AuT windows never interact, so this is exact).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from omnistream.multimodal.audio import MAX_AUDIO_SECONDS, load_audio
from omnistream.multimodal.errors import MediaError, MediaLimitError
from omnistream.multimodal.hashing import hash_media
from omnistream.multimodal.image import MAX_DECODED_PIXELS, preprocess_image
from omnistream.multimodal.mel import log_mel_spectrogram
from omnistream.multimodal.mel_kernel import active_kernel
from omnistream.multimodal.mrope import mrope_positions_for_prompt
from omnistream.multimodal.placeholders import (
    AudioItem,
    ImageItem,
    MediaItem,
    MultimodalTokenIds,
    PlaceholderRange,
    VideoItem,
    audio_token_count,
    expand_placeholders,
)
from omnistream.multimodal.tensor_codec import to_tensor_data
from omnistream.multimodal.video import MAX_VIDEO_SECONDS, load_video, preprocess_video
from omnistream.scheduler.media_layout import image_options, video_options
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.tensor_data import PositionSegment

MODALITIES = ("audio", "image", "video")
SAMPLE_RATE = 16_000
FRAMES_PER_SECOND = 100  # log-mel frames per second of audio (hop 160 at 16 kHz)
_DEFAULT_MAX_ITEMS = {"audio": 8, "image": 8, "video": 2}


@dataclass(frozen=True)
class MediaLimits:
    """Per-prompt limits; exceeding one raises MediaLimitError naming it."""

    max_items: Mapping[str, int] = field(default_factory=lambda: dict(_DEFAULT_MAX_ITEMS))
    max_audio_seconds: float = MAX_AUDIO_SECONDS  # per clip, soundtracks included
    max_video_frames: int = 768  # frames sampled per video
    max_video_seconds: float = MAX_VIDEO_SECONDS  # a video's duration, as its container declares it
    max_image_pixels: int = MAX_DECODED_PIXELS  # of an image or a video frame as decoded, before resizing

    def __post_init__(self) -> None:  # a modality left out of `max_items` keeps its default (as in vLLM)
        object.__setattr__(self, "max_items", {**_DEFAULT_MAX_ITEMS, **self.max_items})


@dataclass
class ProcessedPrompt:
    prompt: str | None
    token_ids: list[int]
    mm_features: list[MultiModalFeature]
    position_segments: list[PositionSegment]  # explicit M-RoPE ids; empty for text-only prompts
    num_media_tokens: dict[str, int]  # placeholder tokens per modality, for usage reports
    audio_seconds: float  # audio processed, soundtracks included


@dataclass
class _Loaded:
    """One media item after preprocessing, before its placeholders are placed."""

    item: MediaItem
    identifier: str
    inputs: dict[str, torch.Tensor]
    mel: torch.Tensor | None = None  # audio or soundtrack log-mel [128, T]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


class MediaConfig(Protocol):
    """What the processor reads of the thinker's config (the engine's ThinkerConfig is one): the audio tower's
    settings, TM-RoPE's rate and, through MultimodalTokenIds.from_config, the `*_token_id` fields."""

    audio_config: dict[str, Any]
    position_id_per_seconds: float


class InputProcessor:
    def __init__(self, tokenizer: Any, config: MediaConfig, limits: MediaLimits | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.limits = limits or MediaLimits()
        self.token_ids = MultimodalTokenIds.from_config(config)
        self.default_window_frames = int(config.audio_config.get("n_window_infer", 800))
        active_kernel()  # build (or load) the compiled log-mel kernel now rather than on the first audio

    def process(
        self,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        multi_modal_data: Mapping[str, Any] | None = None,
        mm_processor_kwargs: Mapping[str, Any] | None = None,
    ) -> ProcessedPrompt:
        """Token ids come from `prompt_token_ids` if given, else from tokenizing `prompt`; the prompt must hold
        one placeholder per media item (as the chat template renders them)."""
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("a prompt needs text or token ids")
            prompt_token_ids = self.tokenizer.encode(prompt)
        token_ids = [int(t) for t in prompt_token_ids]
        data = {k: v for k, v in (multi_modal_data or {}).items() if v is not None}
        if not data:
            return ProcessedPrompt(prompt, token_ids, [], [], {}, 0.0)
        kwargs = _checked_options(mm_processor_kwargs or {})
        window = self._window_frames(kwargs)
        loaded = self._load_all(data, kwargs, window)
        items = [entry.item for entry in loaded]
        expanded, ranges = expand_placeholders(
            token_ids, items, self.token_ids, position_id_per_seconds=self.config.position_id_per_seconds
        )
        positions, _ = mrope_positions_for_prompt(
            expanded, items, self.token_ids, position_id_per_seconds=self.config.position_id_per_seconds
        )
        features: list[MultiModalFeature] = []
        counts = {m: 0 for m in MODALITIES}
        by_modality = {m: [e for e in loaded if _modality(e.item) == m] for m in MODALITIES}
        for placeholder in ranges:
            entry = by_modality[placeholder.modality][placeholder.item_index]
            features.extend(self._features(entry, placeholder, window))
            counts[placeholder.modality] += placeholder.length
        seconds = sum(e.mel.shape[1] for e in loaded if e.mel is not None) / FRAMES_PER_SECOND
        return ProcessedPrompt(
            prompt, expanded, features, [PositionSegment(start=0, positions=to_tensor_data(positions))],
            {m: n for m, n in counts.items() if n}, seconds,
        )

    def process_prompt(self, prompt: str | Mapping[str, Any]) -> ProcessedPrompt:
        """A prompt as the Python APIs take it: a string, or a dict with "prompt" (text) or
        "prompt_token_ids", optionally "multi_modal_data" and "mm_processor_kwargs"."""
        if isinstance(prompt, str):
            return self.process(prompt)
        if not isinstance(prompt, Mapping) or ("prompt_token_ids" not in prompt and "prompt" not in prompt):
            raise ValueError("a prompt must be a string, {'prompt': str} or {'prompt_token_ids': [...]}")
        return self.process(
            prompt.get("prompt"), prompt.get("prompt_token_ids"), prompt.get("multi_modal_data"),
            prompt.get("mm_processor_kwargs"),
        )

    def _window_frames(self, kwargs: dict[str, Any]) -> int:
        seconds = kwargs.pop("audio_window_s", None)
        if seconds is None:
            return self.default_window_frames
        frames = seconds * FRAMES_PER_SECOND
        if not 1 <= float(seconds) <= 8 or frames != int(frames) or int(frames) % 100:
            raise ValueError(f"audio_window_s must be a whole number of seconds from 1 to 8, got {seconds}")
        return int(frames)

    def _load_all(self, data: Mapping[str, Any], kwargs: dict[str, Any], window: int) -> list[_Loaded]:
        unknown = set(data) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown multi_modal_data keys {sorted(unknown)}; use {list(MODALITIES)}")
        loaded: list[_Loaded] = []
        for modality in MODALITIES:
            sources = _as_list(data.get(modality, []))
            limit = self.limits.max_items.get(modality, 0)
            if len(sources) > limit:
                raise MediaLimitError(modality, "items per prompt", len(sources), limit)
            load = {"audio": self._load_audio, "image": self._load_image, "video": self._load_video}[modality]
            loaded.extend(load(source, kwargs, window) for source in sources)
        return loaded

    def _mel(self, wave: np.ndarray, modality: str) -> torch.Tensor:
        seconds = len(wave) / SAMPLE_RATE
        if seconds > self.limits.max_audio_seconds:
            raise MediaLimitError(modality, "audio seconds", round(seconds, 2), self.limits.max_audio_seconds)
        return log_mel_spectrogram(wave)

    def _load_audio(self, source: Any, kwargs: dict[str, Any], window: int) -> _Loaded:
        wave = load_audio(source, max_seconds=self.limits.max_audio_seconds)
        mel = self._mel(wave, "audio")
        identifier = hash_media("audio", wave, window_frames=window)
        return _Loaded(AudioItem(num_mel_frames=mel.shape[1]), identifier, {}, mel)

    def _load_image(self, source: Any, kwargs: dict[str, Any], window: int) -> _Loaded:
        image = preprocess_image(source, max_decoded_pixels=self.limits.max_image_pixels)
        pixels = torch.from_numpy(np.ascontiguousarray(image.pixel_values))
        grid = torch.tensor([image.grid_thw], dtype=torch.int64)
        identifier = hash_media("image", pixels, grid)
        return _Loaded(ImageItem(grid_thw=image.grid_thw), identifier, {"pixel_values": pixels, "grid_thw": grid})

    def _load_video(self, source: Any, kwargs: dict[str, Any], window: int) -> _Loaded:
        fps = kwargs.get("fps", 2.0)
        max_frames = kwargs.get("max_frames", self.limits.max_video_frames)
        if max_frames > self.limits.max_video_frames:
            raise MediaLimitError("video", "max_frames", max_frames, self.limits.max_video_frames)
        limits = self.limits
        decoded = load_video(source, fps=fps, min_frames=kwargs.get("min_frames", 4),
                             max_frames=max_frames, max_pixels=limits.max_image_pixels,
                             max_seconds=limits.max_video_seconds, max_audio_seconds=limits.max_audio_seconds)
        if len(decoded.frames) > self.limits.max_video_frames:
            raise MediaLimitError("video", "frames", len(decoded.frames), self.limits.max_video_frames)
        video = preprocess_video(decoded.frames, decoded.sample_fps)
        use_audio = kwargs.get("use_audio_in_video")
        if use_audio is None:
            use_audio = decoded.audio is not None  # the soundtrack is never dropped silently
        if use_audio and decoded.audio is None:
            raise MediaError("video: use_audio_in_video is set but the video has no soundtrack")
        mel = self._mel(decoded.audio, "video") if use_audio else None
        pixels = torch.from_numpy(np.ascontiguousarray(video.pixel_values_videos))
        grid = torch.tensor([video.grid_thw], dtype=torch.int64)
        contents = [pixels, grid] + ([mel] if mel is not None else [])
        identifier = hash_media("video", *contents, second_per_grid=video.second_per_grid, window_frames=window)
        item = VideoItem(video.grid_thw, video.second_per_grid, None if mel is None else mel.shape[1])
        return _Loaded(item, identifier, {"pixel_values": pixels, "grid_thw": grid}, mel)

    def _features(self, entry: _Loaded, placeholder: PlaceholderRange, window: int) -> list[MultiModalFeature]:
        if isinstance(entry.item, AudioItem):
            return _audio_windows(entry, placeholder.offset, window)
        inputs = {name: to_tensor_data(t) for name, t in entry.inputs.items()}
        if isinstance(entry.item, ImageItem):
            modality, options = "image", image_options(entry.item.grid_thw)
        else:
            modality, options = "video", video_options(entry.item.grid_thw, entry.item.second_per_grid)
        if isinstance(entry.item, VideoItem) and entry.item.has_audio:
            modality = "video_audio"
            inputs["input_features"] = to_tensor_data(entry.mel)
            inputs["video_mask"] = to_tensor_data(torch.tensor(placeholder.is_video, dtype=torch.bool))
            options["window_frames"] = window
        return [
            MultiModalFeature(
                modality=modality, identifier=entry.identifier, offset=placeholder.offset,
                length=placeholder.length, inputs=inputs, options=options,
            )
        ]


_NUMERIC_OPTIONS = {"fps": float, "audio_window_s": float, "min_frames": int, "max_frames": int}


def _checked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """mm_processor_kwargs with every known entry of the right type (checked before any medium is loaded):
    `use_audio_in_video` true, false or null, the others positive finite numbers (frames: whole); else
    ValueError naming the entry."""
    checked = dict(options)
    for name, kind in _NUMERIC_OPTIONS.items():
        if checked.get(name) is not None:
            checked[name] = _number(name, checked[name], kind)
    use_audio = checked.get("use_audio_in_video")
    if use_audio is not None and not isinstance(use_audio, bool):
        raise ValueError(f"mm_processor_kwargs.use_audio_in_video must be true or false, got {use_audio!r}")
    return checked


def _number(name: str, value: Any, kind: type) -> Any:
    try:
        number = kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    except (OverflowError, ValueError):  # an int past float's range; an infinite or NaN float for an int
        number = None
    if number is None or not 0 < number < math.inf or number != value:
        raise ValueError(f"mm_processor_kwargs.{name} must be a positive {'whole ' if kind is int else ''}"
                         f"number, got {value!r}")
    return number


def _modality(item: MediaItem) -> str:
    return "audio" if isinstance(item, AudioItem) else "image" if isinstance(item, ImageItem) else "video"


def _audio_windows(entry: _Loaded, offset: int, window: int) -> list[MultiModalFeature]:
    """One scheduler item per attention window of the clip: encoded (and cached) independently."""
    mel = entry.mel
    total = mel.shape[1]
    features = []
    for index, start in enumerate(range(0, total, window)):
        frames = mel[:, start : start + window]
        rows = audio_token_count(frames.shape[1])
        features.append(
            MultiModalFeature(
                modality="audio",
                identifier=f"{entry.identifier}:{index}",
                offset=offset,
                length=rows,
                inputs={"input_features": to_tensor_data(frames.contiguous())},
                options={"window_frames": window, "part_of_longer_clip": total >= FRAMES_PER_SECOND},
            )
        )
        offset += rows
    return features
