"""The speech lane in the engine (embedded tiny model): the first audio comes one engine step after the first
text token (1365 samples, then 1920 per frame); seeded codes and audio are the same alone or in any batch and
under thinker and talker preemption; an abort mid-speech frees the talker blocks, the voice slot and the
runner's stream at once."""

from __future__ import annotations

import time

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


def _chat(llm: LLM, questions: list[str], voices: list[str]) -> list[tuple[list[int], bytes, str]]:
    conversations = [[{"role": "user", "content": q}] for q in questions]
    outputs = llm.chat(conversations, [_params(voice) for voice in voices], use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].audio, o.outputs[0].audio_finish_reason) for o in outputs]


@pytest.fixture(scope="module")
def alone():
    with LLM(max_audio_frames=FRAMES) as llm:
        return _chat(llm, QUESTIONS[:1], ["ethan"])[0]


def test_seeded_speech_is_the_same_in_a_batch_of_voices(alone):
    with LLM(max_audio_frames=FRAMES) as llm:
        batched = _chat(llm, QUESTIONS, ["ethan", "chelsie", "aiden"])
    assert batched[0] == alone
    assert len(alone[1]) == 2 * (FRAMES * 1920 - 555) and alone[2] == "length"
    assert batched[1][1] != batched[0][1][: len(batched[1][1])]  # other requests speak otherwise


def test_seeded_speech_survives_thinker_and_talker_preemption(alone):
    with LLM(max_audio_frames=FRAMES, num_kv_blocks=3, num_talker_kv_blocks=3, max_num_voices=3) as llm:
        batched = _chat(llm, QUESTIONS, ["ethan", "chelsie", "aiden"])
        scheduler = llm.engine.scheduler
        assert scheduler.num_preemptions > 0 and scheduler.speech.num_preemptions > 0
    assert batched[0] == alone


def _prompt_ids(engine: EngineCore, question: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
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


def test_the_first_audio_comes_one_step_after_the_first_text_token(engine):
    _add(engine, "first")
    first_text = first_audio = None
    pieces = []
    for step in range(40):
        for output in engine.step():
            if output.new_token_ids and first_text is None:
                first_text = step
            if output.new_audio:
                first_audio = step if first_audio is None else first_audio
                pieces.append(len(output.new_audio) // 2)
        if not engine.has_unfinished_requests():
            break
    assert first_audio == first_text + 1
    assert pieces == [1365] + [1920] * (FRAMES - 1)


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
    assert batched[0] == alone
