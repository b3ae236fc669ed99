"""The speech lane end to end against HF transformers (fp32, tiny random stack saved with save_pretrained):
greedy thinker tokens and greedy [16 x n] codes identical to one HF `generate` call per request, for text
prompts whose replies stop on a stop token (HF's thinker_eos_token_id), and the streamed PCM16 equal to the
whole-sequence code2wav decode of those codes (HF's and ours) to one quantization step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream import LLM, SamplingParams
from omnistream.scheduler.sampling_params import SpeechParams
from tests.parity.speech_oracle import build_hf_omni, save_hf_omni

MAX_FRAMES = 24
PROMPTS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello to the world."},
    ],
    [{"role": "user", "content": "What is two plus two?"}],
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    hf = build_hf_omni(seed=7)
    path = save_hf_omni(hf, tmp_path_factory.mktemp("omni"))
    llm = LLM(str(path), dtype="float32", max_audio_frames=MAX_FRAMES, max_num_voices=2)
    yield hf, llm
    llm.shutdown()


def _stop_token(llm: LLM, prompt: list[dict]) -> int:
    """A token the greedy reply samples at step >= 2 that it has not sampled before: the reply's stop token."""
    reply = llm.chat([prompt], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].token_ids
    return next(t for i, t in enumerate(reply) if i >= 2 and t not in reply[:i])


def _pcm16(wav: torch.Tensor) -> np.ndarray:
    return (wav.double().clamp(-1, 1) * 32767).round().to(torch.int64).numpy()


@torch.no_grad()
def _hf_generate(hf, prompt_ids: list[int], stop: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    captured = []
    decode = hf.code2wav.chunked_decode

    def capture(codes, **kwargs):
        captured.append(codes)
        return decode(codes, **kwargs)

    hf.code2wav.chunked_decode = capture
    try:
        sequences, wav = hf.generate(
            input_ids=torch.tensor([prompt_ids]),
            speaker="Chelsie",
            thinker_max_new_tokens=8,
            thinker_eos_token_id=stop,
            thinker_do_sample=False,
            talker_do_sample=False,
            talker_max_new_tokens=MAX_FRAMES + 1,
        )
    finally:
        hf.code2wav.chunked_decode = decode
    return sequences[0, len(prompt_ids) :].tolist(), captured[0][0], wav.reshape(-1)


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_greedy_codes_and_audio_equal_hf_generate(stack, index):
    hf, llm = stack
    prompt = PROMPTS[index]
    stop = _stop_token(llm, prompt)
    params = SamplingParams(
        temperature=0,
        max_tokens=8,
        stop_token_ids=[stop],
        speech=SpeechParams(voice="chelsie", do_sample=False),
    )
    speech = llm.engine.executor.runner.speech
    execute, frames_sent = speech.execute, []

    def record(schedule):
        frames = execute(schedule)
        frames_sent.extend(frame.codes for frame in frames if frame.codes)
        return frames

    speech.execute = record
    try:
        output = llm.chat([prompt], params)[0]
    finally:
        speech.execute = execute
    ours = output.outputs[0]
    hf_tokens, hf_codes, hf_wav = _hf_generate(hf, output.prompt_token_ids, stop)
    assert ours.token_ids == hf_tokens and ours.finish_reason == "stop"
    assert torch.equal(torch.tensor(frames_sent).T, hf_codes)
    pcm = np.frombuffer(ours.audio, dtype="<i2").astype(np.int64)
    frames = hf_codes.shape[1]
    assert frames >= 4 and len(pcm) == frames * 1920 - 555
    assert ours.audio_finish_reason == ("length" if frames == MAX_FRAMES else "stop")
    assert np.abs(pcm - _pcm16(hf_wav)).max() <= 1
    assert np.abs(pcm).max() > 1000  # the calibrated vocoder is neither silent nor a comparison of zeros
    ours_full = speech.code2wav(hf_codes.unsqueeze(0)).reshape(-1)
    assert np.abs(pcm - _pcm16(ours_full)).max() <= 1
