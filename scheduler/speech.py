"""The speech lane's scheduling (torch-free): per speaking request its talker progress gated on the thinker's
reply, its talker KV blocks (a pool of their own) and its voice slot (at most max_num_voices at once).

Talker step 0 prefills the user turns and the 9 assistant rows once the first reply token y0 exists; step s
(s >= 1) feeds frame s-1 back with one text row: y_s, then tts_eos once the reply ends, then tts_pad, until
the talker samples codec EOS or the frame limit. Each step samples one frame, so the first audio comes one
engine step after the first text token. A request short of talker blocks is preempted and later recomputed
from its stored frames and text ids: nothing is re-sampled, so audio already sent never changes.

A live session's turn speaks like an offline request of the same conversation: its talker prompt is every user
turn so far, so the thinker keeps the hidden rows at a session's media as they are prefilled (until the session
ends or its input is rolled back past them), and the turn's talker KV and voice slot are freed when its speech
ends or the turn is cancelled.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from omnistream.scheduler.media_layout import layout_of
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.speech_outputs import (
    NUM_ASSISTANT_ROWS,
    SpeechFrame,
    SpeechSchedule,
    TalkerMedia,
    TalkerPrompt,
    TalkerStep,
)


class SpeechLaneConfig(msgspec.Struct, kw_only=True):
    """The checkpoint's ids the lane needs (read from config.json by the engine) and its limits."""

    speakers: dict[str, int]  # lower-cased voice -> talker-vocabulary id
    num_talker_blocks: int
    block_size: int = 16
    max_num_voices: int = 8
    max_audio_frames: int = 4096  # frames per answer (HF's talker limit); then the audio ends with "length"
    # frames in a voice's first PCM delta: 1 (the first audio one engine step after the first text token), or
    # more, each one step later, so that a client playing at once has that much more audio (the first frame is
    # 1365 samples, 57 ms, each next one 1920, 80 ms) before the next delta must arrive
    first_packet_frames: int = 1
    codec_eos_id: int
    tts_eos_id: int
    tts_pad_id: int
    im_start_id: int
    user_id: int
    assistant_id: int

    def __post_init__(self) -> None:
        for name in ("num_talker_blocks", "block_size", "max_num_voices", "max_audio_frames", "first_packet_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def user_turn_positions(token_ids: list[int], im_start_id: int, user_id: int) -> list[int]:
    """Positions the talker keeps: every position of a user turn, from its <|im_start|> up to the next
    <|im_start|> (so the `\\n` after <|im_end|> too); system and assistant turns are dropped."""
    kept, role = [], None
    for index, token in enumerate(token_ids):
        if token == im_start_id:
            role = token_ids[index + 1] if index + 1 < len(token_ids) else None
        if role == user_id:
            kept.append(index)
    return kept


def talker_media(kept: list[int], media: Sequence[MultiModalFeature]) -> list[TalkerMedia]:
    """The user turns' media as the talker's prompt holds them (`kept`: the thinker positions of its user rows),
    in order; media outside the user turns are dropped with their turn. ValueError for a feature whose options
    carry no layout."""
    row_of = {position: row for row, position in enumerate(kept)}
    placed = []
    for feature in sorted(media, key=lambda f: f.offset):
        row = row_of.get(feature.offset)
        if row is not None and feature.length:
            placed.append(TalkerMedia(row=row, length=feature.length, layout=layout_of(feature)))
    return placed


class AudioUpdate(NamedTuple):
    """A request's audio from one step."""

    pcm: bytes  # PCM16 samples made final this step
    finish: str | None  # "stop" (codec EOS) or "length" once its speech ended
    reply_only: bool  # a talker-only request: its speech is all it produces


class _PendingReply(NamedTuple):
    req_id: str
    prompt: list[int]
    voice: str
    seed: int | None
    do_sample: bool
    reply: list[int]


class SpeechRequest:
    """One speaking request: its talker prompt, the reply read so far, the frames sampled, its blocks."""

    def __init__(
        self,
        req_id: str,
        speaker: int,
        slot: int,
        user_ids: list[int],
        header_ids: list[int],
        seed: int,
        do_sample: bool,
        max_frames: int,
    ) -> None:
        self.req_id = req_id
        self.speaker = speaker
        self.slot = slot
        self.user_ids = user_ids
        self.header_ids = header_ids  # <|im_start|>, assistant, \n (y0 is the reply's first token)
        self.seed = seed  # every request's draws are keyed: an unseeded one gets a random seed at admission
        self.do_sample = do_sample
        self.max_frames = max_frames
        self.reply: list[int] = []  # the thinker's output tokens so far
        self.reply_finish: str | None = None  # the thinker's finish reason once its text ended
        self.frames: list[list[int]] = []  # every sampled frame's codes, kept for recompute
        self.text_ids: list[int] = []  # text_ids[j]: the thinker id read by talker step j + 1
        self.num_computed = 0  # talker rows in the KV
        self.held = b""  # PCM16 of the first frames, until the first packet has first_packet_frames of them
        self.blocks: list[int] = []
        self.session = False  # a live session's turn: the thinker rows it reads outlive its speech
        self.reply_only = False  # talker only: the reply was given, no thinker request exists
        # user rows at media placeholders, fed the thinker's hidden rows
        self.media_rows: list[int] = []
        self.media_positions: list[int] = []  # their positions in the thinker's prompt
        self.media: list[TalkerMedia] = []  # the media there, for their positions in the talker's prompt

    @property
    def num_prompt_rows(self) -> int:
        return len(self.user_ids) + NUM_ASSISTANT_ROWS

    def text_id(self, step: int, tts_eos: int, tts_pad: int) -> int | None:
        """The thinker id talker step `step` (>= 1) reads, or None while the thinker has not sampled it. As HF:
        y_s until the reply's last fed token, then tts_eos, then tts_pad. A reply that stopped (EOS, stop
        token) never feeds its final token; one cut by max_tokens feeds it, so every returned word is spoken."""
        if step <= len(self.text_ids):
            return self.text_ids[step - 1]
        num_fed = len(self.reply) - (self.reply_finish == "stop")  # y_0..y_{num_fed-1} are spoken
        if step < num_fed:
            return self.reply[step]
        if self.reply_finish is None:
            return None
        return tts_eos if step == max(num_fed, 1) else tts_pad


class SpeechScheduler:
    """Admission (voice slots), gating, talker block allocation with preemption, and frame bookkeeping.
    With no config (a checkpoint without a talker, or speech disabled) every speech request is refused."""

    def __init__(self, config: SpeechLaneConfig | None) -> None:
        self.config = config
        num_blocks = config.num_talker_blocks if config else 0
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.free_slots: deque[int] = deque(range(config.max_num_voices if config else 0))
        self.requests: dict[str, SpeechRequest] = {}  # admitted, speech not yet ended; oldest first
        self.pending: deque[_PendingReply] = deque()  # talker-only requests waiting for a voice slot
        self.new_captures: dict[str, list[int]] = {}  # admitted since the last schedule(): rows to capture
        self.finished: list[str] = []  # ended since the last schedule()
        self.released: list[str] = []  # since the last schedule(): requests whose kept thinker rows are dropped
        self.rolled_back: dict[str, int] = {}  # since the last schedule(): sessions cut to this many tokens
        self.sessions: set[str] = set()  # open sessions whose media rows the thinker keeps
        # each SpeechSchedule not settled yet (by id) -> the requests it planned (a turn's frames never reach the next)
        self._planned: dict[int, dict[str, SpeechRequest]] = {}
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.pending)

    @property
    def has_work(self) -> bool:
        return self.has_unfinished or bool(self.finished or self.released or self.rolled_back or self.new_captures)

    @property
    def kv_usage(self) -> float:
        """Fraction of the talker's KV blocks in use."""
        total = self.config.num_talker_blocks if self.config else 0
        return (total - len(self.free_blocks)) / total if total else 0.0

    def needs_thinker_rows(self, req_id: str) -> bool:
        """The request's talker prompt reads thinker hidden rows: its thinker prefill must compute them (no
        prefix-cache hit)."""
        request = self.requests.get(req_id)
        return request is not None and bool(request.media_rows)

    def check(
        self,
        req_id: str,
        prompt: list[int],
        params_voice: str,
        media: Sequence[MultiModalFeature],
        open_input: bool,
    ) -> None:
        """ValueError (a 400 at the front ends) unless this request can be spoken."""
        config = self.config
        if config is None:
            raise ValueError("audio output: this engine has no talker (the checkpoint has none, or speech is disabled)")
        if params_voice not in config.speakers:
            raise ValueError(
                f"unknown voice {params_voice!r}; this checkpoint speaks {sorted(config.speakers)}"
            )
        header = len(prompt) - 3
        if header < 0 or prompt[header : header + 2] != [config.im_start_id, config.assistant_id]:
            raise ValueError(
                f"request {req_id!r}: audio output needs a prompt that ends with the assistant header"
            )
        kept = user_turn_positions(prompt, config.im_start_id, config.user_id)
        talker_media(kept, media)
        num_rows = len(kept) + NUM_ASSISTANT_ROWS + 1
        if num_rows > config.num_talker_blocks * config.block_size:
            raise ValueError(
                f"request {req_id!r}: the talker prompt needs {num_rows} rows, but the talker KV pool holds only "
                f"{config.num_talker_blocks * config.block_size}"
            )

    def admit(
        self,
        req_id: str,
        prompt: list[int],
        voice: str,
        seed: int | None,
        do_sample: bool,
        media: Sequence[MultiModalFeature] = (),
        session: bool = False,
    ) -> bool:
        """Take a voice slot for a request (checked) the thinker is about to admit, or for a session's committed
        turn; False when none is free. A request that holds one already (resumed after a thinker preemption)
        keeps it."""
        if req_id in self.requests:
            return True
        if not self.free_slots:
            return False
        config = self.config
        positions = user_turn_positions(prompt, config.im_start_id, config.user_id)
        user_ids = [prompt[i] for i in positions]
        capacity = config.num_talker_blocks * config.block_size
        max_frames = min(config.max_audio_frames, capacity - len(user_ids) - NUM_ASSISTANT_ROWS)
        self.requests[req_id] = SpeechRequest(
            req_id,
            config.speakers[voice],
            self.free_slots.popleft(),
            user_ids,
            prompt[-3:],
            random.getrandbits(63) if seed is None else seed,
            do_sample,
            max_frames,
        )
        self.requests[req_id].session = session
        placed = talker_media(positions, media)
        media_rows = [row for piece in placed for row in range(piece.row, piece.row + piece.length)]
        if media_rows:  # the thinker keeps its hidden rows there for the talker's prompt
            self.requests[req_id].media = placed
            self.requests[req_id].media_rows = media_rows
            self.requests[req_id].media_positions = [positions[row] for row in media_rows]
            if not session:  # a session's rows were asked for as its input came (watch_session)
                self.new_captures.setdefault(req_id, []).extend(self.requests[req_id].media_positions)
        return True

    def add_reply(
        self, req_id: str, prompt: list[int], voice: str, seed: int | None, do_sample: bool, reply: list[int]
    ) -> None:
        """A talker-only request (checked): speak `reply` (thinker ids, every one of them) once a voice slot is
        free; nothing is generated by the thinker."""
        if req_id in self.requests or any(pending.req_id == req_id for pending in self.pending):
            raise ValueError(f"duplicate request id {req_id!r}")
        if not reply:
            raise ValueError(f"request {req_id!r}: there is no text to speak")
        self.pending.append(_PendingReply(req_id, prompt, voice, seed, do_sample, list(reply)))

    def watch_session(self, req_id: str, media: Sequence[MultiModalFeature]) -> None:
        """New input of a live session: the thinker keeps its hidden rows at `media` (user-turn input), which
        the talker prompt of any later spoken turn reads. Nothing happens without a speech lane."""
        if self.config is None:
            return
        self.sessions.add(req_id)
        positions = [position for feature in media for position in range(feature.offset, feature.end)]
        if positions:
            self.new_captures.setdefault(req_id, []).extend(positions)

    def roll_back(self, req_id: str, num_tokens: int) -> None:
        """A live session dropped its input from num_tokens on: the rows kept past it are never read again."""
        if req_id not in self.sessions:
            return
        self.rolled_back[req_id] = min(num_tokens, self.rolled_back.get(req_id, num_tokens))
        if req_id in self.new_captures:
            self.new_captures[req_id] = [p for p in self.new_captures[req_id] if p < num_tokens]

    def end_turn(self, req_id: str) -> bool:
        """Stop a session turn's speech now (cancel, barge-in), keeping the session's thinker rows; False if
        the session was not speaking."""
        request = self.requests.get(req_id)
        if request is None:
            return False
        self._end(request)
        return True

    def on_reply(self, req_id: str, new_token_ids: list[int], finish_reason: str | None) -> None:
        """The thinker's new tokens (and finish) for a request; an aborted reply ends its speech."""
        request = self.requests.get(req_id)
        if request is None:
            return
        request.reply.extend(new_token_ids)
        if finish_reason == "abort":
            self.abort(req_id)
        elif finish_reason is not None:
            request.reply_finish = finish_reason

    def abort(self, req_id: str) -> bool:
        """End a request's speech now (abort, a session's end); False if it had none."""
        if req_id in self.sessions:
            self.sessions.discard(req_id)
            self.released.append(req_id)
            self.rolled_back.pop(req_id, None)
        request = self.requests.get(req_id)
        if request is None:
            kept = [pending for pending in self.pending if pending.req_id != req_id]
            found, self.pending = len(kept) < len(self.pending), deque(kept)
            return found
        self._end(request)
        return True

    def schedule(self) -> SpeechSchedule | None:
        """This step's talker steps, oldest request first; None when the lane has nothing to do."""
        if not self.has_work:
            return None
        while self.pending and self.free_slots:
            pending = self.pending.popleft()
            self.admit(pending.req_id, pending.prompt, pending.voice, pending.seed, pending.do_sample)
            self.requests[pending.req_id].reply_only = True
            self.on_reply(pending.req_id, pending.reply, "length")  # every given token is spoken
        steps: list[TalkerStep] = []
        scheduled: set[str] = set()
        for request in list(self.requests.values()):
            step = self._plan(request)
            if step is None or not self._allocate(request, scheduled):
                continue
            step.block_ids = list(request.blocks)
            steps.append(step)
            scheduled.add(request.req_id)
        finished, self.finished = self.finished, []
        released, self.released = self.released, []
        captures, self.new_captures = self.new_captures, {}
        rolled_back, self.rolled_back = self.rolled_back, {}
        schedule = SpeechSchedule(
            steps=steps,
            finished_req_ids=finished,
            released_req_ids=released,
            rolled_back=rolled_back,
            capture=captures,
        )
        self._planned[id(schedule)] = {step.req_id: self.requests[step.req_id] for step in steps}
        return schedule

    def update(self, schedule: SpeechSchedule | None, frames: list[SpeechFrame]) -> dict[str, AudioUpdate]:
        """Record the frames a step produced; per request its new PCM16 bytes and, when its speech ended, the
        audio finish reason ("stop" at codec EOS, "length" at the frame limit)."""
        if schedule is None:
            return {}
        result: dict[str, AudioUpdate] = {}
        by_id = {frame.req_id: frame for frame in frames}
        planned = self._planned.pop(id(schedule), {})
        for step in schedule.steps:
            request, frame = self.requests.get(step.req_id), by_id.get(step.req_id)
            if request is None or frame is None or planned.get(step.req_id) is not request:
                continue  # aborted meanwhile (a session's next turn has the same id)
            request.num_computed = step.num_computed + step.num_rows
            del request.text_ids[step.frame_index - len(step.frames) :]
            request.text_ids.extend(step.text_ids)
            finish = None
            if not frame.codes:
                finish = "stop"
            else:
                request.frames.append(frame.codes)
                if len(request.frames) >= request.max_frames:
                    finish = "length"
            pcm, request.held = request.held + frame.pcm, b""
            if finish is None and len(request.frames) < self.config.first_packet_frames:
                pcm, request.held = b"", pcm  # the first packet is not full yet
            if finish is not None:
                self._end(request)
            if pcm or finish is not None:
                result[step.req_id] = AudioUpdate(pcm, finish, request.reply_only)
        return result

    def _plan(self, request: SpeechRequest) -> TalkerStep | None:
        """The rows that bring the request's KV up to sampling its next frame, or None while its text waits."""
        config = self.config
        num_frames = len(request.frames)
        if not request.reply:
            return None
        first_step = max(1, request.num_computed - request.num_prompt_rows + 1)
        text_ids = []
        for step in range(first_step, num_frames + 1):
            text_id = request.text_id(step, config.tts_eos_id, config.tts_pad_id)
            if text_id is None:
                return None
            text_ids.append(text_id)
        prompt = None
        if request.num_computed == 0:
            prompt = TalkerPrompt(
                user_ids=request.user_ids,
                header_ids=request.header_ids + request.reply[:1],
                speaker=request.speaker,
                media_rows=request.media_rows,
                media_positions=request.media_positions,
                media=request.media,
            )
        return TalkerStep(
            req_id=request.req_id,
            block_ids=[],
            num_computed=request.num_computed,
            prompt=prompt,
            frames=request.frames[first_step - 1 :],
            text_ids=text_ids,
            frame_index=num_frames,
            seed=request.seed,
            do_sample=request.do_sample,
        )

    def _allocate(self, request: SpeechRequest, scheduled: set[str]) -> bool:
        """Blocks for the request's rows through its next frame, preempting the newest requests not scheduled
        this step; False when it had to preempt itself."""
        config = self.config
        needed = -(-(request.num_prompt_rows + len(request.frames)) // config.block_size) - len(
            request.blocks
        )
        while needed > len(self.free_blocks):
            victim = next(
                (r for r in reversed(self.requests.values()) if r.req_id not in scheduled and r.blocks), None
            )
            if victim is None:
                return False  # the others scheduled this step hold the blocks: wait for the next step
            self._preempt(victim)
            if victim is request:
                return False
        request.blocks.extend(self.free_blocks.popleft() for _ in range(max(needed, 0)))
        return True

    def _preempt(self, request: SpeechRequest) -> None:
        """Drop the request's talker KV; its next step recomputes it from the stored prompt, frames, text."""
        self.free_blocks.extend(request.blocks)
        request.blocks = []
        request.num_computed = 0
        self.num_preemptions += 1

    def _end(self, request: SpeechRequest) -> None:
        self.free_blocks.extend(request.blocks)
        self.free_slots.append(request.slot)
        del self.requests[request.req_id]
        self.finished.append(request.req_id)
        if not request.session:
            self.released.append(request.req_id)
