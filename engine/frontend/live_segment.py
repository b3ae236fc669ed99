"""One media segment of a live session's user turn (speech, a video with its audio, or a silent video): audio
chunks and camera frames in, the placeholder tokens, positions and media features of the offline request for the
same clip or video out, as soon as each is final. Does not talk to the engine (the session sends what it emits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from omnistream.multimodal.hashing import hash_media
from omnistream.multimodal.image import ImageSource
from omnistream.multimodal.live_video import LiveFrames
from omnistream.multimodal.mrope import MRopeBuilder
from omnistream.multimodal.placeholders import LiveInterleave, MultimodalTokenIds
from omnistream.multimodal.streaming_mel import (
    AudioWindow,
    Samples,
    StreamingAudioWindows,
)
from omnistream.multimodal.tensor_codec import to_tensor_data
from omnistream.scheduler.media_layout import SOUNDTRACK_OPTIONS, video_slice_options
from omnistream.scheduler.mm_feature import MultiModalFeature

AUDIO, VIDEO, VIDEO_AUDIO = "audio", "video", "video_audio"
_OPENING_TOKENS = {AUDIO: 1, VIDEO: 1, VIDEO_AUDIO: 2}  # <|audio_start|>; <|vision_start|>; both

Emit = Callable[[list[int], torch.Tensor, list[MultiModalFeature]], None]


@dataclass
class _Window:
    window: AudioWindow
    identifier: str
    first_token: int  # index of its first audio token in the segment's soundtrack


class LiveSegment:
    """One media segment. Every public call hands what became final to `emit(tokens, positions, features)`
    (at most once per call), right after adding those tokens' positions to `positions`.

    A segment runs from its first audio chunk or frame until text or the commit ends it. Its kind is fixed by
    whichever content is complete first: the first audio window or the first frame pair. A frame that came
    before the first audio window makes it a video with its audio; audio that came before the first pair
    completed does too; otherwise it is speech alone (`<|audio_start|>`…) or a silent video (`<|vision_start|>`…).
    Both streams start at the segment's start (the first audio sample and the first frame are taken as
    simultaneous). Content of a kind a fixed segment cannot take (`takes_audio`, `takes_frames`) belongs in the
    next segment, as an offline request with two items would hold it.

    Frame pairs and audio tokens are merged by time (`LiveInterleave`): a pair is emitted once the audio before
    it is encoded, audio once the next pair (or the end) is known. An audio window cut by pairs is sent as
    pieces that share one encoder run (`MultiModalFeature.row_offset`).
    """

    def __init__(
        self,
        positions: MRopeBuilder,
        token_ids: MultimodalTokenIds,
        window_frames: int,
        video_fps: float,
        emit: Emit,
    ) -> None:
        self.positions = positions
        self.ids = token_ids
        self.window_frames = window_frames
        self.video_fps = video_fps
        self.emit = emit
        self.kind: str | None = None  # fixed with the first complete content
        self._audio: StreamingAudioWindows | None = None
        self._frames: LiveFrames | None = None
        self._windows: list[_Window] = []  # of a video with audio: encoded, some rows maybe not emitted yet
        self._audio_tokens = 0  # soundtrack tokens encoded so far
        self._pairs: list[np.ndarray | None] = []  # complete frame pairs, by slice index
        self._interleave: LiveInterleave | None = None
        self._out: tuple[list[int], list[torch.Tensor], list[MultiModalFeature]] = ([], [], [])

    @property
    def takes_audio(self) -> bool:
        return self.kind != VIDEO

    @property
    def takes_frames(self) -> bool:
        return self.kind in (None, VIDEO, VIDEO_AUDIO)

    def feed_audio(self, pcm: Samples, sample_rate: int) -> None:
        if not self.takes_audio:
            raise ValueError("this segment is a silent video: audio starts a new segment")
        if self._audio is None:
            self._audio = StreamingAudioWindows(self.window_frames, sample_rate)
        windows = self._audio.feed(pcm)
        if windows and self.kind is None:
            self._fix(VIDEO_AUDIO if self._has_frames else AUDIO)
        self._add_windows(windows)
        self._flush_out()

    def feed_frame(self, image: ImageSource, timestamp_s: float) -> None:
        if not self.takes_frames:
            raise ValueError("this segment is speech alone: a frame starts a new segment")
        if self._frames is None:
            self._frames = LiveFrames(self.video_fps)
        pair = self._frames.add(image, timestamp_s)
        if pair is not None:
            if self.kind is None:
                self._fix(VIDEO_AUDIO if self._audio is not None else VIDEO)
            self._add_pair(pair)
        self._flush_out()

    def close(self) -> None:
        """End of the segment: the last partial window, an odd last frame (repeated), the closing token(s).
        A segment that got nothing (its only frame was refused) leaves no tokens."""
        if self.kind is None:
            if self._audio is None and not self._has_frames:
                return
            self._fix(VIDEO_AUDIO if self._has_frames and self._audio is not None else VIDEO if self._has_frames
                      else AUDIO)
        if self._frames is not None:
            pair = self._frames.flush()
            if pair is not None:
                self._add_pair(pair)
        if self._audio is not None:
            self._add_windows(self._audio.flush())
        if self._interleave is not None:
            self._interleave.end()
            self._pump()
        count = _OPENING_TOKENS[self.kind]
        closing = {AUDIO: [self.ids.audio_end], VIDEO: [self.ids.vision_end],
                   VIDEO_AUDIO: [self.ids.audio_end, self.ids.vision_end]}[self.kind]
        self._put(closing, self.positions.add_end(count))
        self._flush_out()

    # ---- internals -----------------------------------------------------------------------------------------

    @property
    def _has_frames(self) -> bool:
        return self._frames is not None and self._frames.num_frames > 0

    def _fix(self, kind: str) -> None:
        self.kind = kind
        opening = {AUDIO: [self.ids.audio_start], VIDEO: [self.ids.vision_start],
                   VIDEO_AUDIO: [self.ids.vision_start, self.ids.audio_start]}[kind]
        self._put(opening, self.positions.add_start(_OPENING_TOKENS[kind]))
        if kind != AUDIO:
            self._interleave = LiveInterleave(self._frames.second_per_grid, with_audio=kind == VIDEO_AUDIO,
                                              position_id_per_seconds=self.positions.position_id_per_seconds)

    def _add_windows(self, windows: list[AudioWindow]) -> None:
        for window in windows:
            identifier = hash_media("audio-window", window.features, window_frames=self.window_frames)
            if self.kind == AUDIO:
                self._put_audio(window, identifier, 0, window.num_tokens, self.positions.add_audio(window.num_tokens))
                continue
            self._windows.append(_Window(window, identifier, self._audio_tokens))
            self._audio_tokens += window.num_tokens
            self._interleave.add_audio(window.num_tokens)
        if self._interleave is not None:
            self._pump()

    def _add_pair(self, pair: np.ndarray) -> None:
        self._pairs.append(pair)
        self._interleave.add_slices(1)
        self._pump()

    def _pump(self) -> None:
        for run in self._interleave.take():
            if run.is_video:
                self._put_pair(run.slice_index)
                continue
            token = run.audio_start
            while token < run.audio_stop:  # one piece per window the run crosses
                held = self._window_of(token)
                stop = min(run.audio_stop, held.first_token + held.window.num_tokens)
                positions = self.positions.add_soundtrack(stop - token)
                self._put_audio(held.window, held.identifier, token - held.first_token, stop - token, positions)
                token = stop
            while self._windows and self._windows[0].first_token + self._windows[0].window.num_tokens <= token:
                self._windows.pop(0)  # every row placed

    def _window_of(self, token: int) -> _Window:
        for held in self._windows:
            if held.first_token <= token < held.first_token + held.window.num_tokens:
                return held
        raise AssertionError(f"audio token {token} has no window")

    def _put_audio(self, window: AudioWindow, identifier: str, row: int, count: int, positions: torch.Tensor) -> None:
        whole = row == 0 and count == window.num_tokens
        feature = MultiModalFeature(
            modality="audio",
            identifier=identifier,
            offset=self.positions.num_tokens - count,
            length=count,
            inputs={"input_features": to_tensor_data(window.features.contiguous())},
            options={"window_frames": self.window_frames, "part_of_longer_clip": window.stop_frame >= 100,
                     **(SOUNDTRACK_OPTIONS if self.kind == VIDEO_AUDIO else {})},
            row_offset=row,
            encoder_rows=0 if whole else window.num_tokens,
        )
        self._put([self.ids.audio_pad] * count, positions, feature)

    def _put_pair(self, index: int) -> None:
        pixels = torch.from_numpy(self._pairs[index])
        self._pairs[index] = None  # placed; its pixels travel with the feature
        grid_thw = self._frames.grid_thw
        second_per_grid = self._frames.second_per_grid
        positions = self.positions.add_video_slice(index, grid_thw, second_per_grid)
        count = positions.shape[1]
        grid = torch.tensor([grid_thw], dtype=torch.int64)
        feature = MultiModalFeature(
            modality="video",
            identifier=hash_media("video-pair", pixels, grid),
            offset=self.positions.num_tokens - count,
            length=count,
            inputs={"pixel_values": to_tensor_data(pixels), "grid_thw": to_tensor_data(grid)},
            options=video_slice_options(index, grid_thw, second_per_grid, with_audio=self.kind == VIDEO_AUDIO),
        )
        self._put([self.ids.video_pad] * count, positions, feature)

    def _put(self, tokens: list[int], positions: torch.Tensor, feature: MultiModalFeature | None = None) -> None:
        self._out[0].extend(tokens)
        self._out[1].append(positions)
        if feature is not None:
            self._out[2].append(feature)

    def _flush_out(self) -> None:
        tokens, positions, features = self._out
        if tokens:
            self._out = ([], [], [])
            self.emit(tokens, torch.cat(positions, dim=1), features)
