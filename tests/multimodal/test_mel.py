import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from omnistream.multimodal.errors import MediaTooSmallError
from omnistream.multimodal.mel import log_mel_spectrogram, num_mel_frames

EXTRACTOR = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)


def hf_features(wave: np.ndarray) -> torch.Tensor:
    out = EXTRACTOR(wave, sampling_rate=16000, return_tensors="pt", padding="longest", truncation=False)
    return out["input_features"][0]


@pytest.mark.parametrize("length", [201, 1000, 40000, 40100, 40159, 40160, 160 * 1024, 160 * 1024 + 37,
                                    160 * 4096, 160 * 4096 + 37])
def test_matches_whisper_feature_extractor(length):
    rng = np.random.default_rng(length)
    t = np.arange(length) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) * np.linspace(0, 1, length) + 0.01 * rng.standard_normal(length))
    wave = wave.astype(np.float32)
    ours = log_mel_spectrogram(wave)
    assert ours.dtype == torch.float32 and ours.shape == (128, length // 160) == (128, num_mel_frames(length))
    assert (ours - hf_features(wave)).abs().max().item() < 1e-4


def test_silence_and_torch_input():
    wave = torch.zeros(16000)
    ours = log_mel_spectrogram(wave)
    assert torch.equal(ours, hf_features(wave.numpy()))


def test_too_short():
    with pytest.raises(MediaTooSmallError):
        log_mel_spectrogram(np.zeros(200, np.float32))


@pytest.mark.parametrize("threads", [1, 2])
def test_silence_then_burst_with_either_chunking(threads):
    """Digital silence (mel exactly 0, clamped at 1e-10), a quiet stretch below the clip's max − 8 and a loud burst,
    spread over several chunks; one thread and several threads chunk the clip differently."""
    length = 160 * 9000 + 11
    t = np.arange(length) / 16000
    wave = 1e-5 * np.random.default_rng(7).standard_normal(length) * (t > 10)
    wave[length // 2 : length // 2 + 8000] += 0.8 * np.sin(2 * np.pi * 1200 * t[:8000])
    wave[: 16000 * 3] = 0.0
    wave = wave.astype(np.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = log_mel_spectrogram(wave)
    finally:
        torch.set_num_threads(previous)
    reference = hf_features(wave)
    floor = reference.min().item()
    assert (reference == floor).float().mean() > 0.3  # the clamp at max − 8 is exercised
    assert (ours - reference).abs().max().item() < 1e-4
    assert torch.equal(ours == floor, reference == floor)
