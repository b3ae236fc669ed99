"""StreamingSession: one live conversation whose audio (and camera frames) are encoded and prefilled while the
user speaks.

Audio is turned into log-mel frames as it arrives (multimodal.streaming_mel); each finished attention
window becomes audio placeholder tokens plus its mel features, appended to the open request at once,
so the engine prefills it under its token budget while the user is still talking. commit() closes the
turn (last partial window, <|audio_end|>, the assistant prompt) and streams the answer; the session
then takes the next turn's input with all its KV kept. Positions continue through one MRopeBuilder.
Frames with timestamps (append_frame) make the turn's media a video with its audio, interleaved by time as
offline with use_audio_in_video, or a silent video (frontend/live_segment.py says how a segment is decided).
A still image (append_image) is the offline image part at that place (frontend/still_image.py).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np

from omnistream.engine.checkpoint.model_config import ThinkerConfig
from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.messages import (
    AppendInput,
    Batch,
    CancelTurn,
    CommitTurn,
    OpenSession,
    RollbackInput,
    SessionTail,
)
from omnistream.engine.frontend.grammar_check import GrammarCheck
from omnistream.engine.frontend.live_segment import LiveSegment
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.engine.frontend.still_image import still_image_input
from omnistream.engine.frontend.streams import EngineStreams
from omnistream.multimodal.image import MAX_DECODED_PIXELS, ImageInputs, ImageSource, preprocess_image
from omnistream.multimodal.mrope import MRopeBuilder
from omnistream.multimodal.placeholders import MultimodalTokenIds
from omnistream.multimodal.tensor_codec import to_tensor_data
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.tensor_data import PositionSegment

FRAMES_PER_SECOND = 100
MAX_VIDEO_FPS = 30.0  # a camera's rate; Qwen3-Omni is trained at 2
_DISCARDED = "the media segment in progress (its audio and frames since it began) was discarded"


class SegmentDiscardedError(ValueError):
    """The engine refused a live session's input (the session is full) and the media segment in progress, every
    chunk and frame since it began, was discarded on both sides; the session goes on from before that segment."""


class StreamingSession:
    def __init__(
        self,
        streams: EngineStreams,
        tokenizer: Tokenizer,
        model_config: ThinkerConfig,
        on_close: Callable[[], None],
        session_id: str,
        system_prompt: str | None,
        sampling_params: SamplingParams,
        audio_window_s: float,
        video_fps: float = 2.0,
        grammar_check: GrammarCheck | None = None,
    ) -> None:
        window_frames = audio_window_s * FRAMES_PER_SECOND
        if not 1 <= audio_window_s <= 8 or window_frames != int(window_frames) or int(window_frames) % 100:
            raise ValueError(f"audio_window_s must be a whole number of seconds from 1 to 8, got {audio_window_s}")
        if not 0 < video_fps <= MAX_VIDEO_FPS:
            raise ValueError(f"video_fps must be in (0, {MAX_VIDEO_FPS}], got {video_fps}")
        sampling_params.check_vocab(model_config.text.vocab_size)
        self.streams = streams
        self.tokenizer = tokenizer
        self.model_config = model_config
        self._on_close = on_close
        self.session_id = session_id
        self.system_prompt = system_prompt
        self.sampling_params = sampling_params
        self.grammar_check = grammar_check  # compiles a committed turn's structured output before the engine
        self.window_frames = int(window_frames)
        config = model_config
        self.ids = MultimodalTokenIds.from_config(config)
        self.im_end = tokenizer.encode("<|im_end|>")[0]
        self.positions = MRopeBuilder(position_id_per_seconds=config.position_id_per_seconds)
        self._media: LiveSegment | None = None  # the turn's media segment in progress (speech, video or both)
        self._before_media: tuple[MRopeBuilder, int, int] | None = None  # positions, audio and video tokens before it
        self._media_out: list = []  # engine commands the segment made in the current call
        self.video_fps = video_fps  # frame rate of live video: frame n of a segment at t0 + n / video_fps
        self.num_audio_tokens = 0  # audio placeholder tokens in the conversation so far (for usage)
        self.num_video_tokens = 0  # video placeholder tokens in the conversation so far (for usage)
        self._images: list[tuple[int, int]] = []  # (first pad, pads) of each still image in the conversation
        self._turn = 0
        # the last answer's start (positions, audio and video tokens there), kept until the next commit: what
        # truncate_answer goes back to
        self._answer_start: tuple[MRopeBuilder, int, int] | None = None
        self._in_user_turn = False
        self._answer_end = 0  # the conversation's tokens when the user turn after the last answer began
        self._answering = False
        self._closed = False
        self._lock = asyncio.Lock()  # appends and commits apply in the order they were called

    # ---- the conversation ----------------------------------------------------------------------

    async def start(self) -> None:
        text = f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n" if self.system_prompt else ""
        tokens = self.tokenizer.encode(text) if text else []
        segments = [self._segment(0, self.positions.add_text(len(tokens)))] if tokens else []
        await self.streams.call(OpenSession(session_id=self.session_id, prompt_token_ids=tokens, position_segments=segments))
        self.streams.sessions.add(self.session_id)

    async def append_audio(self, pcm: np.ndarray | bytes, sample_rate: int = 16_000) -> None:
        """PCM of the user's speech: float samples, int16 samples, or PCM16 little-endian bytes."""
        async with self._lock:
            self._check_open()
            if self._media is not None and not self._media.takes_audio:
                await self._end_media()  # speech after a silent video: a new segment
            await self._open_media()
            ops = await asyncio.to_thread(self._media_ops, self._media.feed_audio, pcm, sample_rate)
            await self._send_media(ops)  # every finished window in one engine command: they are scheduled together

    async def append_frame(self, image: ImageSource, timestamp_s: float) -> None:
        """A camera frame (encoded bytes, PIL image or HWC uint8 array) captured at `timestamp_s` seconds.

        Frames beside the turn's speech make it a video with its audio (exactly the offline request for that
        video with use_audio_in_video); frames without speech, a silent video. A segment's clock starts at its
        first frame: frame n must come at t0 + n / video_fps (± half an interval), else ValueError (frames
        out of order, missing or early). Frames are resized to the first frame's grid (the offline video
        pixel budget). A frame during speech alone (its first window already prefilled) or speech after a
        silent video starts a new segment. Consecutive frames are encoded in pairs, each prefilled once the
        audio before it is.
        """
        async with self._lock:
            self._check_open()
            if self._media is not None and not self._media.takes_frames:
                await self._end_media()  # a camera turned on during speech: a new segment
            await self._open_media()
            ops = await asyncio.to_thread(self._media_ops, self._media.feed_frame, image, timestamp_s)
            await self._send_media(ops)

    async def append_image(self, image: ImageSource | ImageInputs, max_decoded_pixels: int = MAX_DECODED_PIXELS) -> int:
        """A still image in the user's turn, here (it ends any media segment in progress): exactly the offline
        request's image part at this place, preprocessed with the offline pixel budget (or given preprocessed, by
        `preprocess_image`). Returns its image tokens. A MediaError (the image cannot be used: not an image, more
        than `max_decoded_pixels`) or a ValueError from the engine (the session is full) leaves no part of it."""
        async with self._lock:
            self._check_open()
            if not isinstance(image, ImageInputs):
                image = await asyncio.to_thread(preprocess_image, image, max_decoded_pixels=max_decoded_pixels)
            await self._begin_user_turn()
            await self._end_media()
            before = copy.copy(self.positions)
            tokens, positions, feature = still_image_input(image, self.positions, self.ids)
            try:
                await self._append_tokens(tokens, positions, [feature])
            except ValueError:
                self.positions = before
                raise
            self._images.append((feature.offset, feature.length))
            return feature.length

    @property
    def num_image_tokens(self) -> int:
        """Image placeholder tokens in the conversation so far (for usage)."""
        return sum(count for _, count in self._images)

    async def append_text(self, text: str) -> None:
        """Typed input inside the user's turn (ends any audio segment in progress)."""
        async with self._lock:
            self._check_open()
            await self._begin_user_turn()
            await self._end_media()
            tokens = self.tokenizer.encode(text)
            if tokens:
                await self._append_tokens(tokens, self.positions.add_text(len(tokens)))

    async def commit(self, sampling_params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """End the user's turn and stream the answer (cumulative RequestOutputs, the last one finished)."""
        params = sampling_params or self.sampling_params
        params.check_vocab(self.model_config.text.vocab_size)
        if self.grammar_check is not None:
            await self.grammar_check.check(params.structured_outputs)
        async with self._lock:
            self._check_open()
            await self._begin_user_turn()
            # The last partial window, <|audio_end|> and the assistant prompt reach the engine in ONE
            # command with the commit: one step then prefills them all and samples the first token.
            # (As separate commands, each waited for the step the previous one had started: two or
            # three steps between end of speech and the first token instead of one.)
            in_media = self._media is not None
            before_commit = copy.copy(self.positions)
            ops = await self._end_media_ops()
            tokens = self.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
            start = self._num_tokens
            segment = self._segment(start, self.positions.add_text(len(tokens)))
            ops.append(CommitTurn(session_id=self.session_id, token_ids=tokens, sampling_params=params,
                                  position_segments=[segment]))
            queue = self.streams.open_stream(self.session_id)
            self._in_user_turn = False
            self._answering = True
            self._turn += 1
            self.streams.register(self.session_id, None, tokens, params)
            self._answer_start = None
            try:
                await self.streams.call(Batch(commands=ops))
            except BaseException as exc:
                self.streams.forget(self.session_id)
                self.streams.close_stream(self.session_id)
                self._in_user_turn, self._answering, self._turn = True, False, self._turn - 1
                if not isinstance(exc, ValueError):
                    raise
                if not in_media:  # CommitTurn alone, refused whole: only the positions moved
                    self.positions = before_commit
                    raise
                await self._roll_back(*self._before_media, exc)  # the segment's last window may have been applied
                raise SegmentDiscardedError(f"{exc}; {_DISCARDED}") from exc
            self._answer_start = (copy.copy(self.positions), self.num_audio_tokens, self.num_video_tokens)
        return self._answer(queue)

    async def truncate_answer(self, num_tokens: int) -> int:
        """Keep only the first `num_tokens` tokens of the last answer (what the user heard of it): the answer
        is stopped (text and speech), and the engine drops the rest of it and all input after it (the caller
        sends any input in progress again); the next user turn closes the shortened answer. Returns the number
        of answer tokens kept. ValueError when no answer was given since the last commit."""
        async with self._lock:
            self._check_open()
            if self._answer_start is None:
                raise ValueError(f"session {self.session_id!r} has no answer to truncate")
            if self._answering:
                await self.streams.call(CancelTurn(session_id=self.session_id))
                self._answering = False
            positions, num_audio_tokens, num_video_tokens = self._answer_start
            tail = await self.streams.call(SessionTail(session_id=self.session_id))
            answer_tokens = (tail.num_tokens if not self._in_user_turn else self._answer_end) - positions.num_tokens
            kept = max(0, min(num_tokens, answer_tokens))
            await self.streams.call(RollbackInput(session_id=self.session_id, num_tokens=positions.num_tokens + kept))
            self._restore(copy.copy(positions), num_audio_tokens, num_video_tokens)
            self.positions.add_text(kept)
            self._in_user_turn = False
            return kept

    async def clear_audio(self) -> None:
        """Discard the media segment in progress (its audio and frames, appended since it began, not yet ended by
        a commit or by text) as if it had never been sent: the engine drops its tokens, media and KV, and the
        positions go back to where the segment started. Nothing happens when no audio is in progress."""
        async with self._lock:
            self._check_open()
            if self._media is None:
                return
            positions, num_audio_tokens, num_video_tokens = self._before_media
            await self.streams.call(RollbackInput(session_id=self.session_id, num_tokens=positions.num_tokens))
            self._restore(positions, num_audio_tokens, num_video_tokens)

    async def cancel(self) -> None:
        """Stop the answer being generated (its stream ends with finish_reason "abort"); the session
        stays open for the next turn."""
        await self.streams.call(CancelTurn(session_id=self.session_id))

    async def close(self) -> None:
        """End the session and free everything it holds."""
        if self._closed:
            return
        self._closed = True
        self.streams.sessions.discard(self.session_id)
        self._on_close()
        await self.streams.abort(self.session_id)

    # ---- internals -----------------------------------------------------------------------------

    @property
    def _num_tokens(self) -> int:
        return self.positions.num_tokens  # the single count of the session's tokens

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"session {self.session_id!r} is closed")

    def _segment(self, start: int, positions: Any) -> PositionSegment:
        return PositionSegment(start=start, positions=to_tensor_data(positions))

    async def _begin_user_turn(self) -> None:
        if self._in_user_turn:
            return
        if self._answering:  # the user speaks over the answer: stop it (barge-in)
            await self.streams.call(CancelTurn(session_id=self.session_id))
            self._answering = False
        text = "<|im_start|>user\n"
        if self._turn:
            # the answer's tokens (however many were sampled before it stopped) continue the positions;
            # an answer cut short (length, cancel) is closed with <|im_end|> as the chat format wants
            tail = await self.streams.call(SessionTail(session_id=self.session_id))
            self.positions.add_text(tail.num_tokens - self._num_tokens)
            self._answer_end = tail.num_tokens
            text = ("\n" if tail.last_token_id == self.im_end else "<|im_end|>\n") + text
        self._in_user_turn = True
        tokens = self.tokenizer.encode(text)
        await self._append_tokens(tokens, self.positions.add_text(len(tokens)))

    async def _append_tokens(self, tokens: list[int], positions: Any, features: list | None = None) -> None:
        await self.streams.call(self._input_op(tokens, positions, features))

    def _input_op(self, tokens: list[int], positions: Any, features: list | None = None) -> AppendInput:
        """The engine command appending `tokens` (whose positions were just added)."""
        start = self._num_tokens - len(tokens)
        return AppendInput(session_id=self.session_id, token_ids=tokens, mm_features=features or [],
                           position_segments=[self._segment(start, positions)])

    async def _open_media(self) -> None:
        if self._media is None:
            await self._begin_user_turn()
            self._before_media = (copy.copy(self.positions), self.num_audio_tokens, self.num_video_tokens)
            self._media = LiveSegment(self.positions, self.ids, self.window_frames, self.video_fps, self._media_op)

    def _media_op(self, tokens: list[int], positions: Any, features: list) -> None:
        """The segment's output: an engine command for tokens whose positions it just added."""
        self.num_audio_tokens += tokens.count(self.ids.audio_pad)
        self.num_video_tokens += tokens.count(self.ids.video_pad)
        self._media_out.append(self._input_op(tokens, positions, features))

    def _media_ops(self, call: Any, *args: Any) -> list:
        """Run a segment call; the engine commands it made."""
        try:
            call(*args)
        finally:
            ops, self._media_out = self._media_out, []
        return ops

    async def _send_media(self, ops: list) -> None:
        """Send a segment's engine commands. If the engine refuses them (the session is full: max_model_len or
        the KV pool), the segment in progress is discarded on both sides, as clear_audio() does, so that the
        conversation stays consistent (commit() answers what came before it); SegmentDiscardedError says so."""
        if not ops:
            return
        try:
            await self.streams.call(Batch(commands=ops))
        except ValueError as exc:
            await self._roll_back(*self._before_media, exc)
            raise SegmentDiscardedError(f"{exc}; {_DISCARDED}") from exc

    async def _roll_back(self, positions: MRopeBuilder, num_audio_tokens: int, num_video_tokens: int,
                         cause: ValueError) -> None:
        """After a refused batch (the commands before the refused one were applied): the engine drops the
        session's input past `positions`, and the session goes back to that state."""
        try:
            await self.streams.call(RollbackInput(session_id=self.session_id, num_tokens=positions.num_tokens))
        except ValueError as exc:
            raise ValueError(f"{cause}; the session could not be rolled back ({exc}): close it") from cause
        self._restore(positions, num_audio_tokens, num_video_tokens)

    def _restore(self, positions: MRopeBuilder, num_audio_tokens: int, num_video_tokens: int) -> None:
        self.positions, self.num_audio_tokens, self.num_video_tokens = positions, num_audio_tokens, num_video_tokens
        self._images = [image for image in self._images if image[0] < positions.num_tokens]
        self._media = self._before_media = None

    async def _end_media(self) -> None:
        ops = await self._end_media_ops()
        await self._send_media(ops)

    async def _end_media_ops(self) -> list:
        """Close the media segment in progress: the engine commands for its last content and closing tokens."""
        if self._media is None:
            return []
        media, self._media = self._media, None
        return await asyncio.to_thread(self._media_ops, media.close)

    async def _answer(self, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        try:
            async for output in self.streams.drain(queue):
                yield output
                if output.finished:
                    self._answering = False
                    return
        finally:
            self.streams.close_stream(self.session_id)
            if self._answering:  # the caller stopped reading: stop generating
                self.streams.post(CancelTurn(session_id=self.session_id))
                self._answering = False

