"""Code2wav against HF transformers' `forward` on the whole code sequence (the oracle), in fp32 on the tiny
stack with real rates: our whole-sequence decode, the stream frame by frame and in random chunks (1365 samples
for the first frame, then 1920 per frame, n·1920 − 555 in all) within 1e-5; the fast stream equals its slow
twin; and the embedded model's calibrated vocoder is neither silent nor clipped.
"""

from __future__ import annotations

import pytest
import torch

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.models.code2wav import Code2Wav
from omnistream.engine.model_executor.models.code2wav_stream import (
    Code2WavStream,
    ReferenceCode2WavStream,
)
from omnistream.engine.model_executor.speech_loader import load_speech_models
from tests.parity.speech_oracle import build_hf_omni, calibration_codes, save_hf_omni

TOL = 1e-5
FRAMES = 90  # more than the 72-frame window, so the ring wraps


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf_omni(seed=3)
    models = load_speech_models(save_hf_omni(hf, tmp_path_factory.mktemp("omni")))
    return hf.code2wav, models.code2wav


@pytest.fixture(scope="module")
def codes():
    return calibration_codes(FRAMES, seed=7)


@pytest.fixture(scope="module")
def hf_wav(pair, codes):
    with torch.no_grad():
        return pair[0](codes).reshape(-1)


def test_the_whole_sequence_decode_equals_hf_forward_with_n_1920_minus_555_samples(pair, codes, hf_wav):
    with torch.no_grad():
        ours = pair[1](codes).reshape(-1)
    assert hf_wav.numel() == FRAMES * 1920 - 555 == pair[1].config.num_samples(FRAMES)
    assert (ours - hf_wav).abs().max() <= TOL
    assert hf_wav.abs().max() > 0.1  # the comparison is not between silences


def test_a_stream_fed_frame_by_frame_equals_hf_forward(pair, codes, hf_wav):
    stream = Code2WavStream(pair[1])
    pieces = [stream.push(codes[0, :, t : t + 1]) for t in range(FRAMES)]
    assert [p.numel() for p in pieces[:3]] == [1365, 1920, 1920]
    assert all(p.numel() == 1920 for p in pieces[1:])
    assert (torch.cat(pieces) - hf_wav).abs().max() <= TOL


@pytest.mark.parametrize("seed", [0, 1])
def test_a_stream_fed_random_chunks_equals_hf_forward(pair, codes, hf_wav, seed):
    generator = torch.Generator().manual_seed(seed)
    stream, pieces, start = Code2WavStream(pair[1]), [], 0
    while start < FRAMES:
        size = int(torch.randint(1, 80, (1,), generator=generator))
        pieces.append(stream.push(codes[0, :, start : start + size]))
        start += size
    assert stream.num_frames == FRAMES
    assert (torch.cat(pieces) - hf_wav).abs().max() <= TOL


def test_the_fast_stream_equals_its_slow_twin_frame_by_frame(pair, codes):
    fast, slow = Code2WavStream(pair[1]), ReferenceCode2WavStream(pair[1])
    for t in range(75):
        frame = codes[0, :, t : t + 1]
        a, b = fast.push(frame), slow.push(frame)
        assert a.shape == b.shape and (a - b).abs().max() <= TOL, t


def test_a_voice_state_holds_a_72_frame_ring_and_fixed_buffers(pair, codes):
    stream = Code2WavStream(pair[1])
    stream.push(codes[0, :, :5])
    after_five = stream.state.num_values()
    stream.push(codes[0, :, 5:80])
    config = pair[1].config
    ring = 2 * config.num_hidden_layers * config.sliding_window * config.num_key_value_heads * config.head_dim
    assert stream.state.ring.num_values() == ring
    assert stream.state.num_values() == after_five  # nothing grows with the length of the speech


def test_bad_code_shapes_are_refused(pair):
    stream = Code2WavStream(pair[1])
    with pytest.raises(ValueError, match="codes must be"):
        stream.push(torch.zeros(15, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must be"):
        stream.push(torch.zeros(16, 0, dtype=torch.long))


@torch.no_grad()
def test_the_embedded_vocoder_is_neither_silent_nor_clipped():
    code2wav: Code2Wav = load_speech_models(default_model_path()).code2wav
    first, second = (code2wav(calibration_codes(40, seed)).reshape(-1) for seed in (0, 1))
    captured = []
    handle = code2wav.decoder[-1].register_forward_hook(lambda module, args, out: captured.append(out))
    code2wav(calibration_codes(40, 0))
    handle.remove()
    rms = captured[0].pow(2).mean().sqrt().item()
    assert 0.1 < rms < 0.4, rms
    for wav in (first, second):
        assert (wav.abs() >= 1.0).float().mean() < 0.01
    assert (first - second).abs().mean() > 0.05 * rms
