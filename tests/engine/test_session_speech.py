"""Spoken turns of live sessions (the embedded tiny model): a session turn's text and audio equal the offline
request of the same conversation (its talker prompt holds every user turn, with the hidden rows of audio that
was prefilled while the user spoke, turns before it included; camera frames as the offline video, with or
without its audio, placed in the talker's prompt as HF places it); a cancel stops text and speech at once and
frees the turn's talker blocks and voice, while the session keeps its kept rows until it closes; a turn's
answer can be truncated to what was heard and the conversation goes on from there; the rows a session keeps are
exactly its context's media, at the talker's width (a discarded segment leaves none behind)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.engine.worker import speech_runner
from omnistream.engine.worker.talker_positions import talker_prompt_positions
from omnistream.scheduler.sampling_params import SamplingParams, SpeechParams

FRAMES = 6
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
SPOKEN = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, seed=7, speech=SpeechParams(voice="chelsie"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(dtype="float32", num_kv_blocks=512, max_num_batched_tokens=64, max_audio_frames=FRAMES,
                      engine_process=False)
    yield engine
    engine.shutdown()


def _speech(seconds: float, seed: int) -> np.ndarray:
    n = int(seconds * 16000) // 160 * 160
    t = np.arange(n) / 16000
    wave = 0.2 * np.sin(2 * np.pi * (180 + 250 * t) * t) + 0.03 * np.random.default_rng(seed).standard_normal(n)
    return wave.astype(np.float32)


async def _turn(session, wave: np.ndarray, params: SamplingParams):
    for start in range(0, len(wave), 1600):  # 100 ms chunks, prefilled while the "user" speaks
        await session.append_audio(wave[start : start + 1600], 16000)
    final = None
    async for output in await session.commit(params):
        final = output
    assert final.finished
    return final.outputs[0]


async def _offline(llm: AsyncLLM, prompt_ids: list[int], clips: list[np.ndarray]):
    request = {"prompt_token_ids": prompt_ids, "multi_modal_data": {"audio": [(c, 16000) for c in clips]},
               "mm_processor_kwargs": {"audio_window_s": 2}}
    final = None
    async for output in llm.generate(request, SPOKEN):
        final = output
    return final.outputs[0]


def test_spoken_session_turns_equal_offline_requests_of_the_conversation(llm):
    first, second = _speech(2.4, 1), _speech(1.8, 2)

    async def run():
        session = await llm.open_session(system_prompt=None, sampling_params=SPOKEN, audio_window_s=2)
        answer1 = await _turn(session, first, SPOKEN)
        answer2 = await _turn(session, second, SPOKEN)
        await session.close()
        tok = llm.tokenizer
        head, audio = tok.encode("<|im_start|>user\n"), tok.encode(AUDIO)
        turn_end = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
        prompt1 = head + audio + turn_end
        prompt2 = prompt1 + answer1.token_ids + tok.encode("<|im_end|>\n<|im_start|>user\n") + audio + turn_end
        return answer1, answer2, await _offline(llm, prompt1, [first]), await _offline(llm, prompt2, [first, second])

    answer1, answer2, offline1, offline2 = asyncio.run(run())
    for live, offline in ((answer1, offline1), (answer2, offline2)):
        assert live.token_ids == offline.token_ids
        assert len(live.audio) == 2 * (FRAMES * 1920 - 555) and live.audio_finish_reason == "length"
        assert live.audio == offline.audio
    assert answer1.audio != answer2.audio  # the second turn's talker prompt holds both user turns
    speech = llm.core.engine.scheduler.speech
    assert not speech.requests and not speech.sessions and len(speech.free_slots) == speech.config.max_num_voices


@pytest.mark.parametrize("with_speech", [True, False])
def test_a_spoken_turn_with_camera_frames_equals_the_offline_video_request(llm, with_speech, monkeypatch):
    """Speech beside the frames is a video with its audio (use_audio_in_video), frames alone a silent video;
    either way the talker reads the thinker's rows at every slice and soundtrack piece, and its prompt's
    positions (placed piece by piece) equal those of the offline video (placed whole; HF parity elsewhere)."""
    placed = []

    def record(*args):
        placed.append(talker_prompt_positions(*args))
        return placed[-1]

    monkeypatch.setattr(speech_runner, "talker_prompt_positions", record)
    wave, frames = _speech(2.6, 5), np.random.default_rng(6).integers(0, 256, (5, 64, 96, 3), dtype=np.uint8)
    fps = 2.0

    async def run():
        session = await llm.open_session(system_prompt=None, sampling_params=SPOKEN, audio_window_s=2, video_fps=fps)
        sent = 0
        for start in range(0, len(wave) if with_speech else 0, 1600):  # the frames up to each 100 ms of audio
            while sent < len(frames) and sent / fps <= start / 16000:
                await session.append_frame(frames[sent], sent / fps)
                sent += 1
            await session.append_audio(wave[start : start + 1600], 16000)
        for index in range(sent, len(frames)):
            await session.append_frame(frames[index], index / fps)
        await session.append_text("Say what you see.")
        live = None
        async for output in await session.commit(SPOKEN):
            live = output
        await session.close()
        video = (frames, fps, (wave, 16000)) if with_speech else (frames, fps)
        request = {
            "prompt": "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Say what you see.<|im_end|>\n"
            "<|im_start|>assistant\n",
            "multi_modal_data": {"video": [video]},
            "mm_processor_kwargs": {"audio_window_s": 2, "use_audio_in_video": with_speech},
        }
        offline = None
        async for output in llm.generate(request, SPOKEN):
            offline = output
        return live.outputs[0], offline.outputs[0]

    live, offline = asyncio.run(run())
    assert live.token_ids == offline.token_ids
    assert len(live.audio) == 2 * (FRAMES * 1920 - 555) and live.audio == offline.audio
    (live_positions, live_delta), (offline_positions, offline_delta) = placed
    assert torch.equal(live_positions, offline_positions) and live_delta == offline_delta
    assert live_delta < 0 and not torch.equal(live_positions[0], live_positions[2])  # 3-D, not the row index


def test_cancel_stops_the_speech_and_truncate_keeps_what_was_heard(llm):
    runner = llm.core.engine.executor.runner.speech
    scheduler = llm.core.engine.scheduler

    async def run():
        session = await llm.open_session(system_prompt=None, sampling_params=SPOKEN, audio_window_s=2)
        wave = _speech(2.0, 3)
        for start in range(0, len(wave), 1600):
            await session.append_audio(wave[start : start + 1600], 16000)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, speech=SpeechParams())
        outputs = (await session.commit(params)).__aiter__()
        while not (await outputs.__anext__()).outputs[0].audio:
            pass  # until it speaks: then the user barges in
        sid = session.session_id
        rows = runner.kept.num_rows(sid) > 0
        kept = await session.truncate_answer(1)  # stops the answer (text and speech) first
        async for output in outputs:
            last = output
        state = (sid in scheduler.speech.requests, rows, kept, last.outputs[0].finish_reason)
        tail = list(scheduler.get_request(sid).all_token_ids)
        answer = await _turn(session, _speech(1.0, 4), SamplingParams(temperature=0.0, max_tokens=2))
        await session.close()
        for _ in range(100):  # the engine's loop hands the release to the runner at its next step
            if not runner.kept.num_rows(sid):
                break
            await asyncio.sleep(0.02)
        return state, tail, answer, runner.kept.num_rows(sid) > 0

    (speaking, rows_kept, kept, reason), tail, answer, rows_left = asyncio.run(run())
    assert not speaking and rows_kept and kept == 1 and reason == "abort"  # the turn's voice is gone
    im_start, assistant = llm.tokenizer.encode("<|im_start|>assistant\n")[:2]
    header = max(i for i in range(len(tail) - 1) if tail[i : i + 2] == [im_start, assistant])
    assert len(tail) == header + 3 + kept  # the answer holds only its heard tokens
    assert len(answer.token_ids) == 2 and not rows_left
    speech = scheduler.speech
    assert len(speech.free_blocks) == speech.config.num_talker_blocks


def test_a_session_keeps_rows_only_for_the_media_of_its_context(llm):
    """Each turn starts with a false start (a long segment prefilled, then cleared, as a VAD would) before the
    real speech: the rows held are one per audio placeholder left in the context, hidden_projection's output at
    the talker's width, none is waited for once the input is prefilled, and the spoken turns still equal the
    offline requests of the conversation."""
    runner = llm.core.engine.executor.runner.speech
    scheduler = llm.core.engine.scheduler
    first, second = _speech(1.0, 11), _speech(0.8, 12)

    async def false_start(session, seed: int) -> None:
        wave = _speech(3.0, seed)
        for start in range(0, len(wave), 1600):
            await session.append_audio(wave[start : start + 1600], 16000)
        for _ in range(200):  # until its first window's rows are kept
            if runner.kept.num_rows(session.session_id) > held(session.session_id)[0]:
                break
            await asyncio.sleep(0.02)
        await session.clear_audio()

    def held(sid: str) -> tuple[int, int]:
        media = sum(feature.length for feature in scheduler.get_request(sid).mm_features)
        return runner.kept.num_rows(sid), media

    async def run():
        session = await llm.open_session(system_prompt=None, sampling_params=SPOKEN, audio_window_s=2)
        sid, counts = session.session_id, []
        answers = []
        for index, wave in enumerate((first, second)):
            await false_start(session, 20 + index)
            answers.append(await _turn(session, wave, SPOKEN))
            counts.append((held(sid), runner.kept.nbytes(sid)))
            assert sid not in runner.kept.wanted  # every row captured: the thinker's forwards capture nothing more
        await session.close()
        tok = llm.tokenizer
        head, audio = tok.encode("<|im_start|>user\n"), tok.encode(AUDIO)
        turn_end = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
        prompt = head + audio + turn_end + answers[0].token_ids + tok.encode("<|im_end|>\n<|im_start|>user\n")
        return answers[1], await _offline(llm, prompt + audio + turn_end, [first, second]), counts

    live, offline, counts = asyncio.run(run())
    assert live.token_ids == offline.token_ids and live.audio == offline.audio
    width = runner.talker.config.text.hidden_size * runner.dtype.itemsize
    for (rows, media), nbytes in counts:
        assert rows == media and nbytes == rows * width
    assert counts[1][0][0] > counts[0][0][0] > 0
