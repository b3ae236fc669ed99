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


@pytest.mark.parametrize("length", [201, 1000, 40000, 40100, 40159, 40160, 160 * 4096, 160 * 4096 + 37])
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
