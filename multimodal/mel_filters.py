"""The fixed parts of Whisper's log-mel front end: frame sizes, the Slaney mel filterbank and the Hann window.

Shared by the torch path (`mel`) and the compiled kernel (`mel_kernel`), which hands both tables to the C code.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 128


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    log_step = 27.0 / np.log(6.4)
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * log_step)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp(log_step * (mel - 15.0)))


@lru_cache(maxsize=1)
def mel_filters() -> torch.Tensor:
    """Slaney-normalised triangular filters over 0–8 kHz, [201 frequency bins, 128 mels], float32."""
    fft_hz = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), N_MELS + 2))
    widths = np.diff(edges_hz)
    rising = (fft_hz[:, None] - edges_hz[None, :-2]) / widths[None, :-1]
    falling = (edges_hz[None, 2:] - fft_hz[:, None]) / widths[None, 1:]
    filters = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[None, :]
    return torch.from_numpy(filters.astype(np.float32))


@lru_cache(maxsize=1)
def hann_window() -> torch.Tensor:
    """The periodic Hann window of one 400-sample frame, float32 (as HF's extractor uses)."""
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float32)
