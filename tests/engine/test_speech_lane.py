"""The speech lane in the engine (embedded tiny model): the first audio comes one engine step after the first
text token (1365 samples, then 1920 per frame); seeded tokens and codes are identical alone or in any batch and
under thinker and talker preemption, and the audio within one PCM16 step (code2wav runs all voices in one
forward, whose float sums round by batch size); an abort mid-speech frees the talker blocks, the voice slot and the
runner's stream at once."""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import pytest

from omnistream import LLM, SamplingParams
from omnistream.engine.core.engine_core import EngineCore
from omnistream.engine.core.request import EngineCoreRequest
from omnistream.engine.engine_config import EngineConfig
from omnistream.scheduler.sampling_params import SpeechParams

FRAMES = 10
QUESTIONS = ["Tell me a story.", "Hi!", "What is the capital of France?"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(voice: str = "ethan", seed: int = 3) -> SamplingParams:
    return SamplingParams(temperature=0.8, max_tokens=6, seed=seed, speech=SpeechParams(voice=voice))


class Spoken(NamedTuple):
    token_ids: list[int]
    codes: list[list[int]]  # every frame's 16 codes, as the runner sampled them
    audio: bytes
    audio_finish_reason: str


def _record_codes(llm: LLM) -> dict[str, list[list[int]]]:
    """The codes of every frame the speech runner returns from now on, by request id."""
    runner, codes = llm.engine.executor.runner.speech, {}
    execute = runner.execute

    def recording(*args, **kwargs):
        frames = execute(*args, **kwargs)
        for frame in frames:
            if frame.codes:
                codes.setdefault(frame.req_id, []).append(frame.codes)
        return frames

    runner.execute = recording
    return codes


def _chat(llm: LLM, questions: list[str], voices: list[str]) -> list[Spoken]:
    conversations = [[{"role": "user", "content": q}] for q in questions]
    codes = _record_codes(llm)
    outputs = llm.chat(conversations, [_params(voice) for voice in voices], use_tqdm=False)
    return [
        Spoken(o.outputs[0].token_ids, codes[o.request_id], o.outputs[0].audio, o.outputs[0].audio_finish_reason)
        for o in outputs
    ]


def _assert_same_speech(got: Spoken, expected: Spoken) -> None:
    """Tokens, codes and finish reason identical; the PCM16 samples at most one step apart."""
    assert (got.token_ids, got.codes, got.audio_finish_reason) == (
        expected.token_ids,
        expected.codes,
        expected.audio_finish_reason,
    )
    assert len(got.audio) == len(expected.audio)
    diff = np.frombuffer(got.audio, "<i2").astype(np.int32) - np.frombuffer(expected.audio, "<i2")
    assert np.abs(diff).max() <= 1


@pytest.fixture(scope="module")
def alone():
    with LLM(max_audio_frames=FRAMES) as llm:
        return _chat(llm, QUESTIONS[:1], ["ethan"])[0]


def test_seeded_speech_is_the_same_in_a_batch_of_voices(alone):
    with LLM(max_audio_frames=FRAMES) as llm:
        batched = _chat(llm, QUESTIONS, ["ethan", "chelsie", "aiden"])
    _assert_same_speech(batched[0], alone)
    assert len(alone.audio) == 2 * (FRAMES * 1920 - 555) and alone.audio_finish_reason == "length"
    assert batched[1].codes != batched[0].codes[: len(batched[1].codes)]  # other requests speak otherwise


def test_seeded_speech_survives_thinker_and_talker_preemption(alone):
    with LLM(max_audio_frames=FRAMES, num_kv_blocks=3, num_talker_kv_blocks=3, max_num_voices=3) as llm:
        batched = _chat(llm, QUESTIONS, ["ethan", "chelsie", "aiden"])
        scheduler = llm.engine.scheduler
        assert scheduler.num_preemptions > 0 and scheduler.speech.num_preemptions > 0
    _assert_same_speech(batched[0], alone)


def _prompt_ids(engine: EngineCore, question: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return engine.tokenizer.encode(text)


@pytest.fixture(scope="module")
def engine():
    core = EngineCore(EngineConfig(max_audio_frames=FRAMES, max_num_voices=1))
    yield core
    core.shutdown()


def _add(engine: EngineCore, req_id: str) -> None:
    engine.add_request(
        EngineCoreRequest(
            request_id=req_id,
            prompt_token_ids=_prompt_ids(engine, QUESTIONS[0]),
            sampling_params=_params(),
            arrival_time=time.monotonic(),
        )
    )


def _first_audio(engine: EngineCore, req_id: str) -> tuple[int, list[int], bytes]:
    """Steps from the first text token to the first audio, the PCM deltas' sample counts, the audio."""
    _add(engine, req_id)
    first_text = first_audio = None
    pieces, audio = [], b""
    for step in range(40):
        for output in engine.step():
            if output.new_token_ids and first_text is None:
                first_text = step
            if output.new_audio:
                first_audio = step if first_audio is None else first_audio
                pieces.append(len(output.new_audio) // 2)
                audio += output.new_audio
        if not engine.has_unfinished_requests():
            break
    return first_audio - first_text, pieces, audio


def test_the_first_audio_comes_one_step_after_the_first_text_token(engine):
    gap, pieces, _ = _first_audio(engine, "first")
    assert gap == 1 and pieces == [1365] + [1920] * (FRAMES - 1)


def test_a_first_packet_of_two_frames_comes_a_step_later_with_the_same_audio(engine):
    _, _, audio = _first_audio(engine, "one-frame-first")
    later = EngineCore(EngineConfig(max_audio_frames=FRAMES, max_num_voices=1, speech_first_packet_frames=2))
    try:
        gap, pieces, two_frames = _first_audio(later, "one-frame-first")
    finally:
        later.shutdown()
    assert gap == 2 and pieces == [1365 + 1920] + [1920] * (FRAMES - 2) and two_frames == audio


def test_an_abort_mid_speech_frees_blocks_the_voice_and_the_stream(engine):
    _add(engine, "talking")
    while not engine.scheduler.speech.requests.get("talking") or not engine.executor.runner.speech.streams:
        engine.step()
    speech = engine.scheduler.speech
    assert speech.requests["talking"].blocks and not speech.free_slots
    engine.abort_requests(["talking"])
    assert not engine.has_unfinished_requests()
    assert len(speech.free_blocks) == speech.config.num_talker_blocks and len(speech.free_slots) == 1
    engine.step()
    assert not engine.executor.runner.speech.streams and not engine.executor.runner.speech.seen


def test_a_one_word_answer_speaks_and_the_request_counts_until_its_audio_ends(engine):
    engine.add_request(
        EngineCoreRequest(
            request_id="short",
            prompt_token_ids=_prompt_ids(engine, QUESTIONS[1]),
            sampling_params=SamplingParams(max_tokens=1, seed=1, speech=SpeechParams()),
            arrival_time=time.monotonic(),
        )
    )
    text, audio, counted = [], b"", []
    while engine.has_unfinished_requests():
        for output in engine.step():
            text += output.new_token_ids
            audio += output.new_audio
        counted.append(engine.scheduler.get_num_unfinished_requests())
    assert len(text) == 1 and len(audio) == 2 * (FRAMES * 1920 - 555)
    assert counted[0] == 1 and counted[-1] == 0  # the request counts while only its audio goes on


def test_speech_under_async_scheduling_equals_the_synchronous_loop(alone):
    with LLM(max_audio_frames=FRAMES, async_scheduling=True) as llm:
        assert llm.engine.config.overlaps_steps()
        batched = _chat(llm, QUESTIONS, ["ethan", "chelsie", "aiden"])
    _assert_same_speech(batched[0], alone)
