"""A fake engine loop for speech-lane scheduler tests: a scripted thinker and a fake talker runner that keeps
each request's talker rows by block slot and checks every TalkerStep against what it holds."""

from __future__ import annotations

from omnistream.scheduler.outputs import ModelRunnerOutput, SchedulerOutput
from omnistream.scheduler.request import Request
from omnistream.scheduler.sampling_params import SamplingParams, SpeechParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig
from omnistream.scheduler.speech import SpeechLaneConfig
from omnistream.scheduler.speech_outputs import NUM_ASSISTANT_ROWS, SpeechFrame

EOS, IM_START, IM_END, USER, ASSISTANT, NL = 2, 151644, 151645, 872, 77091, 198
TTS_EOS, TTS_PAD, CODEC_EOS = 151673, 151671, 2150
PROMPT = [IM_START, 8948, NL, 7, IM_END, NL, IM_START, USER, NL, 5, 6, IM_END, NL, IM_START, ASSISTANT, NL]


def lane(**overrides) -> SpeechLaneConfig:
    values = {
        "speakers": {"ethan": 2302, "chelsie": 2301},
        "num_talker_blocks": 64,
        "block_size": 4,
        "max_num_voices": 4,
        "max_audio_frames": 4096,
        "codec_eos_id": CODEC_EOS,
        "tts_eos_id": TTS_EOS,
        "tts_pad_id": TTS_PAD,
        "im_start_id": IM_START,
        "user_id": USER,
        "assistant_id": ASSISTANT,
    }
    return SpeechLaneConfig(**(values | overrides))


def make_scheduler(speech: SpeechLaneConfig | None = None, **overrides) -> Scheduler:
    config = {"max_model_len": 256, "num_kv_blocks": 64, "block_size": 4} | overrides
    return Scheduler(SchedulerConfig(speech=speech or lane(), **config))


def speaking(req_id: str, max_tokens: int = 16, voice: str = "ethan", prompt: list[int] = PROMPT) -> Request:
    params = SamplingParams(max_tokens=max_tokens, seed=1, speech=SpeechParams(voice=voice))
    return Request(req_id, prompt, params, [EOS], arrival_time=0.0)


class FakeLane:
    """Runs steps: the thinker samples its script (then EOS); the talker emits frame codes [frame_index] * 16
    until `frames_until_eos[req_id]` frames exist, then codec EOS; pcm is 2 bytes per frame."""

    def __init__(self, scheduler: Scheduler, scripts: dict[str, list[int]], frames_until_eos: dict[str, int]):
        self.scheduler, self.scripts, self.frames_until_eos = (scheduler, scripts, frames_until_eos)
        self.kv: dict[int, tuple] = {}  # talker slot (block * size + offset) -> the row written there
        self.rows_read: dict[str, list[tuple]] = {}  # per request: every row it computed, in order
        self.text_ids: dict[str, list[int]] = {}  # per request: the text id each decode row read, as sent
        self.steps: list[list[str]] = []  # per engine step: requests with a talker step
        self.schedules: list[SchedulerOutput] = []
        self.audio: dict[str, bytes] = {}
        self.audio_finish: dict[str, str] = {}
        self.text_finish: dict[str, str] = {}

    def step(self) -> None:
        scheduler = self.scheduler
        output = scheduler.schedule()
        self.schedules.append(output)
        sampled = [
            r
            for r in output.num_scheduled_tokens
            if scheduler.requests[r].num_computed_tokens == scheduler.requests[r].num_tokens
            and not scheduler.requests[r].accepting_input  # a live session prefilling its input samples nothing
        ]
        tokens = []
        for req_id in sampled:
            script = self.scripts.get(req_id, [])
            done = scheduler.requests[req_id].num_output_tokens
            tokens.append(script[done] if done < len(script) else EOS)
        frames = []
        speech = output.speech.steps if output.speech else []
        self.steps.append([step.req_id for step in speech])
        block = self.scheduler.config.speech.block_size
        for step in speech:
            slots = [b * block + o for b in step.block_ids for o in range(block)]
            held = [self.kv.get(slots[i]) for i in range(step.num_computed)]
            expected = self.rows_read.get(step.req_id, [])[: step.num_computed]
            assert held == expected, f"{step.req_id}: talker KV does not hold the rows it computed"
            rows = []
            if step.prompt is not None:
                prompt = (tuple(step.prompt.user_ids), tuple(step.prompt.header_ids), step.prompt.speaker)
                rows = [("prompt", prompt, i) for i in range(len(step.prompt.user_ids) + NUM_ASSISTANT_ROWS)]
            rows += [("frame", tuple(codes), text) for codes, text in zip(step.frames, step.text_ids)]
            assert len(rows) == step.num_rows
            for i, row in enumerate(rows):
                self.kv[slots[step.num_computed + i]] = row
            self.rows_read[step.req_id] = expected + rows
            sent = self.text_ids.setdefault(step.req_id, [])
            sent[step.frame_index - len(step.frames) :] = step.text_ids
            eos = step.frame_index >= self.frames_until_eos.get(step.req_id, 10**9)
            codes = [] if eos else [step.frame_index] * 16
            frames.append(SpeechFrame(req_id=step.req_id, codes=codes, pcm=b"" if eos else b"ab"))
        result = ModelRunnerOutput(
            sampled_req_ids=sampled, sampled_token_ids=tokens, logprobs=[None] * len(tokens), speech=frames
        )
        for engine_output in scheduler.update_from_output(output, result):
            self.audio[engine_output.req_id] = (
                self.audio.get(engine_output.req_id, b"") + engine_output.new_audio
            )
            if engine_output.audio_finish_reason:
                self.audio_finish[engine_output.req_id] = engine_output.audio_finish_reason
            if engine_output.finish_reason:
                self.text_finish[engine_output.req_id] = engine_output.finish_reason

    def run(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        raise AssertionError("the requests did not finish")
