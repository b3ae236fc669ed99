"""The speech lane's part of the step contract: the talker steps the scheduler plans and the frames the runner
returns (msgspec Structs, carried inside SchedulerOutput and ModelRunnerOutput)."""

from __future__ import annotations

import msgspec

from omnistream.scheduler.media_layout import MediaLayout

NUM_ASSISTANT_ROWS = 9  # the talker prompt's rows after the user turns (header, tts pads, bos, y0)


class TalkerMedia(msgspec.Struct, kw_only=True, array_like=True):
    """A media feature (an item or a piece of one) in the talker's prompt: its rows and how they are placed."""

    row: int  # index into TalkerPrompt.user_ids of its first placeholder
    length: int
    layout: MediaLayout


class TalkerPrompt(msgspec.Struct, kw_only=True):
    """What the talker's prompt rows are built from: thinker ids, and at media placeholders the thinker's hidden
    rows after layer accept_hidden_layer, kept on the device by the runner."""

    user_ids: list[int]  # thinker ids of every user-turn position, in order
    header_ids: list[int]  # <|im_start|>, `assistant`, `\n` and the first reply token y0
    speaker: int  # talker-vocabulary id of the voice
    media_rows: list[int] = []  # indices into user_ids of media placeholders: fed the thinker's hidden rows
    media_positions: list[int] = []  # their thinker positions (whose rows the runner captured)
    media: list[TalkerMedia] = []  # the user turns' media in order, for their M-RoPE positions in the talker


class TalkerStep(msgspec.Struct, kw_only=True):
    """One request's talker rows this step: the prompt (when its KV starts empty), then one decode row per
    frame in `frames` (its 16 codes plus the text row of `text_ids`); the last row samples frame
    `frame_index`."""

    req_id: str
    block_ids: list[int]  # the whole talker block table
    num_computed: int  # rows already in the talker KV (0: prompt and frames are recomputed)
    prompt: TalkerPrompt | None  # set iff num_computed == 0
    frames: list[list[int]]  # codes [num_code_groups] of the frames fed back, oldest first
    text_ids: list[int]  # parallel to frames: the thinker id each decode row reads (reply, tts_eos, tts_pad)
    frame_index: int  # the frame this step samples: the counter of its random draws
    seed: int  # keys the request's random draws with frame_index (a random one when the request set none)
    do_sample: bool  # False: talker and code predictor are greedy

    @property
    def num_rows(self) -> int:
        prompt = 0 if self.prompt is None else len(self.prompt.user_ids) + NUM_ASSISTANT_ROWS
        return prompt + len(self.frames)


class SpeechSchedule(msgspec.Struct, kw_only=True):
    steps: list[TalkerStep] = []
    finished_req_ids: list[str] = []  # voices whose speech ended (codec EOS, length, abort): drop their state
    # requests (or live sessions) that are over: drop the thinker rows kept for them (a session keeps its rows
    # from turn to turn, so its voices end without this)
    released_req_ids: list[str] = []
    # live sessions that dropped their input from this many tokens on: drop the rows kept past it (applied
    # before `capture`, which may want those positions again for new input)
    rolled_back: dict[str, int] = {}
    # newly admitted speaking requests: thinker positions whose hidden rows the thinker's forward must keep
    capture: dict[str, list[int]] = {}


class SpeechFrame(msgspec.Struct, kw_only=True, array_like=True):
    """One request's result of a talker step."""

    req_id: str
    codes: list[int]  # the new frame's codes [num_code_groups]; [] when the talker sampled codec EOS
    pcm: bytes  # PCM16 little-endian, mono, 24 kHz: the samples this frame made final
