"""Live video in sessions: speech streamed beside camera frames equals the offline request for the same video
with its audio (use_audio_in_video) in tokens, positions, encoder rows and greedy answer; frames alone equal
the offline silent video; a camera turned on during speech starts a new segment (= an audio item then a
video item offline); frames out of order or missing are refused with a clear error."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.engine.worker.mm_encode import encode_feature
from omnistream.multimodal.errors import MediaError
from omnistream.multimodal.placeholders import audio_token_count
from omnistream.multimodal.tensor_codec import from_tensor_data
from omnistream.scheduler.sampling_params import SamplingParams
from tests.engine.live_turns import commit_answer

SYSTEM = "You are a helpful assistant."
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
RATE, CHUNK = 16000, 1600  # 100 ms audio chunks


def _speech(seconds: float, seed: int) -> np.ndarray:
    n = int(seconds * RATE) // 160 * 160
    t = np.arange(n) / RATE
    wave = 0.2 * np.sin(2 * np.pi * (180 + 250 * t) * t) + 0.03 * np.random.default_rng(seed).standard_normal(n)
    wave[:1600] += 0.7 * np.sin(2 * np.pi * 440 * t[:1600])  # the loudest frame comes first
    return wave.astype(np.float32)


def _frames(count: int, seed: int, height: int = 64, width: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(dtype="float32", num_kv_blocks=1024, max_num_batched_tokens=64, engine_process=False)
    yield engine
    engine.shutdown()


def _runner(llm: AsyncLLM):
    return llm.core.engine.executor.runner


async def _stream(session, wave: np.ndarray | None, frames: np.ndarray, fps: float, t0: float = 0.0,
                  camera_lag_s: float = 0.0) -> None:
    """Real-time order: the frames captured by the start of each 100 ms of audio (each frame arriving
    `camera_lag_s` late), then that audio."""
    sent = 0
    for start in range(0, 0 if wave is None else len(wave), CHUNK):
        while sent < len(frames) and sent / fps + camera_lag_s <= start / RATE:
            await session.append_frame(frames[sent], t0 + sent / fps)
            sent += 1
        await session.append_audio(wave[start : start + CHUNK], RATE)
    for index in range(sent, len(frames)):  # frames after the audio ended (or with no audio)
        await session.append_frame(frames[index], t0 + index / fps)


async def _offline(llm: AsyncLLM, prompt: str, media: dict, kwargs: dict):
    final = None
    async for output in llm.generate({"prompt": prompt, "multi_modal_data": media, "mm_processor_kwargs": kwargs},
                                     GREEDY):
        final = output
    return final


def _rows(llm: AsyncLLM, features, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position embeddings and DeepStack rows [levels, length, hidden] the features put in the sequence."""
    model, device = _runner(llm).model, _runner(llm).device
    embeds = deepstack = None
    for feature in features:
        output = encode_feature(model, feature, device)
        if embeds is None:
            embeds = torch.zeros(length, output.embeds.shape[-1])
        rows = slice(feature.row_offset, feature.row_offset + feature.length)
        embeds[feature.offset : feature.end] = output.embeds[rows]
        if output.deepstack is not None:
            if deepstack is None:
                deepstack = torch.zeros(output.deepstack.shape[0], length, output.deepstack.shape[-1])
            deepstack[:, feature.offset : feature.end] = output.deepstack[:, rows]
    return embeds, deepstack


def _mel_signature(mel: torch.Tensor) -> torch.Tensor:
    """One row per audio token: the mean of the mel frames it comes from (13 tokens per 100 frames, 8 frames
    each). The tiny random AuT makes nearly equal rows, so this stands in to check which row goes where."""
    rows = []
    for k in range(audio_token_count(mel.shape[1])):
        chunk, j = divmod(k, 13)
        first = chunk * 100 + 8 * j
        rows.append(mel[:, first : min(first + 8, chunk * 100 + 100)].mean(dim=1))  # chunks never mix
    return torch.stack(rows)


def _audio_layout(features, length: int) -> torch.Tensor:
    """Per-position mel signatures of the audio rows the features put in the sequence (zeros elsewhere)."""
    layout = torch.zeros(length, 128)
    for feature in features:
        if feature.modality not in ("audio", "video_audio"):
            continue
        signature = _mel_signature(from_tensor_data(feature.inputs["input_features"]))
        if feature.modality == "audio":
            layout[feature.offset : feature.end] = signature[feature.row_offset : feature.row_offset + feature.length]
        else:
            is_audio = ~from_tensor_data(feature.inputs["video_mask"]).bool()
            layout[torch.arange(feature.offset, feature.end)[is_audio]] = signature
    return layout


def _assert_same_prompt(llm, streamed_state, offline, media, kwargs) -> None:
    n = len(offline.prompt_token_ids)
    assert list(streamed_state.token_ids[:n]) == offline.prompt_token_ids
    ids = llm.input_processor.token_ids
    assert streamed_state.counts == (offline.prompt_token_ids.count(ids.audio_pad),
                                     offline.prompt_token_ids.count(ids.video_pad))
    processed = llm.input_processor.process(offline.prompt, None, media, dict(kwargs))
    assert torch.equal(streamed_state.positions(0, n), from_tensor_data(processed.position_segments[0].positions))
    streamed = [f for f in streamed_state.mm_features if f.offset < n]
    embeds, deepstack = _rows(llm, streamed, n)
    offline_embeds, offline_deepstack = _rows(llm, processed.mm_features, n)
    assert (embeds - offline_embeds).abs().max() < 1e-5
    assert (deepstack - offline_deepstack).abs().max() < 1e-5
    layout = _audio_layout(streamed, n)
    has_audio = any(f.modality in ("audio", "video_audio") for f in processed.mm_features)
    assert bool(layout.abs().sum() > 0) == has_audio
    assert (layout - _audio_layout(processed.mm_features, n)).abs().max() < 1e-5


async def _open(llm: AsyncLLM, **kwargs):
    """A session whose media features are recorded as it sends them (the runner drops the encoder inputs of
    media it has computed)."""
    session = await llm.open_session(**kwargs)
    session.sent_features = []
    send = session._media_op

    def record(tokens, positions, features):
        session.sent_features.extend(features)
        send(tokens, positions, features)

    session._media_op = record
    return session


class _Snapshot:
    def __init__(self, llm, session) -> None:
        state = _runner(llm).requests[session.session_id]
        self.token_ids = list(state.token_ids)
        self.mm_features = list(session.sent_features)
        self.counts = (session.num_audio_tokens, session.num_video_tokens)  # for usage
        self._positions = state.positions(0, len(state.token_ids)).clone()

    def positions(self, start: int, end: int) -> torch.Tensor:
        return self._positions[:, start:end]


@pytest.mark.parametrize("window_s, fps, camera_lag_s", [(2, 2.0, 0.0), (1, 1.0, 0.0), (2, 2.0, 0.7)])
def test_streamed_speech_and_frames_equal_the_offline_video_with_audio(llm, window_s, fps, camera_lag_s):
    """A camera that starts after the speech, but before its first window is encoded, still joins it."""
    wave, frames = _speech(3.3, 0), _frames(7, 1)  # an odd frame count: the last pair repeats its frame
    media = {"video": [(frames, fps, (wave, RATE))]}
    kwargs = {"audio_window_s": window_s, "use_audio_in_video": True}

    async def run():
        session = await _open(llm, system_prompt=SYSTEM, sampling_params=GREEDY, audio_window_s=window_s,
                              video_fps=fps)
        await _stream(session, wave, frames, fps, t0=12.25, camera_lag_s=camera_lag_s)  # timestamps on any clock: the first frame is t0
        answer = await commit_answer(session, GREEDY)
        snapshot = _Snapshot(llm, session)
        prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{VIDEO}<|im_end|>\n<|im_start|>assistant\n"
        offline = await _offline(llm, prompt, media, kwargs)
        await session.close()
        return answer, snapshot, offline

    answer, snapshot, offline = asyncio.run(run())
    _assert_same_prompt(llm, snapshot, offline, media, kwargs)
    pieces = [f for f in snapshot.mm_features if f.modality == "audio" and f.encoder_rows]
    assert (len(pieces) > 0) == (window_s * fps > 1)  # windows cut by frame pairs were sent in pieces
    assert answer == offline.outputs[0].token_ids


def test_frames_alone_equal_the_offline_silent_video(llm):
    frames = _frames(5, 2, 80, 60)
    media = {"video": [(frames, 2.0)]}

    async def run():
        session = await _open(llm, system_prompt=SYSTEM, sampling_params=GREEDY)
        await _stream(session, None, frames, 2.0)
        await session.append_text("What is shown?")
        answer = await commit_answer(session, GREEDY)
        snapshot = _Snapshot(llm, session)
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{VIDEO}What is shown?<|im_end|>\n"
                  "<|im_start|>assistant\n")
        offline = await _offline(llm, prompt, media, {})
        await session.close()
        return answer, snapshot, offline

    answer, snapshot, offline = asyncio.run(run())
    _assert_same_prompt(llm, snapshot, offline, media, {})
    assert answer == offline.outputs[0].token_ids


def test_camera_turned_on_during_speech_starts_a_new_segment(llm):
    """Speech alone for 1.5 s (its first 1 s window already prefilled), then the camera: the audio so far is one
    item, the rest a video with its audio, as the offline request with an audio item then a video item."""
    wave, frames = _speech(3.0, 3), _frames(4, 4)
    split = 24000
    media = {"audio": [(wave[:split], RATE)], "video": [(frames, 2.0, (wave[split:], RATE))]}
    kwargs = {"audio_window_s": 1, "use_audio_in_video": True}

    async def run():
        session = await _open(llm, system_prompt=SYSTEM, sampling_params=GREEDY, audio_window_s=1)
        for start in range(0, split, CHUNK):
            await session.append_audio(wave[start : start + CHUNK], RATE)
        await _stream(session, wave[split:], frames, 2.0, t0=1.5)
        answer = await commit_answer(session, GREEDY)
        snapshot = _Snapshot(llm, session)
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{AUDIO}{VIDEO}<|im_end|>\n"
                  "<|im_start|>assistant\n")
        offline = await _offline(llm, prompt, media, kwargs)
        await session.close()
        return answer, snapshot, offline

    answer, snapshot, offline = asyncio.run(run())
    _assert_same_prompt(llm, snapshot, offline, media, kwargs)
    assert answer == offline.outputs[0].token_ids


def test_frames_out_of_order_or_missing_are_refused_and_the_session_goes_on(llm):
    frames = _frames(4, 5)

    async def run():
        session = await llm.open_session(system_prompt=SYSTEM, sampling_params=GREEDY)
        await session.append_frame(frames[0], 5.0)
        await session.append_frame(frames[1], 5.5)
        with pytest.raises(MediaError, match="out of order"):
            await session.append_frame(frames[2], 5.25)
        with pytest.raises(MediaError, match=r"missing frame.*expected frame 2 at 6\.000 s"):
            await session.append_frame(frames[2], 7.0)
        await session.append_frame(frames[2], 6.0)
        await session.append_frame(frames[3], 6.5)
        tokens = len(await commit_answer(session, GREEDY))
        await session.close()
        return tokens

    assert asyncio.run(run()) == GREEDY.max_tokens


def test_a_frame_rate_out_of_range_is_refused(llm):
    for fps in (0.0, -2.0, 60.0):
        with pytest.raises(ValueError, match="video_fps"):
            asyncio.run(llm.open_session(video_fps=fps))
