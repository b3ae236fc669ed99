"""Log-mel features for the audio tower, equal to HF `WhisperFeatureExtractor` (128 bins, 16 kHz) for one clip.

Frames go through the one per-frame computation `_log_mel_into` (window, rfft, power, Slaney mel product, log10) in
chunks, each written straight into its columns of the one [128, n] output while the chunk is in cache (no padded copy
of the waveform, no full-clip spectrum, no transpose), with Whisper's x / 4 + 1 applied per chunk too; only the
floor at the clip's max − 8 takes a second pass. The rfft is always MKL's, as in HF's extractor. Around it, the
compiled passes of `mel_kernel` (`mel_kernel.active_kernel()` says which kernel is in use, and the chunks run on a
thread pool when torch has several threads) or, without a C compiler or with `OMNISTREAM_MEL_KERNEL=torch`,
pure-torch ops (banded matmuls); all equal HF within float rounding (benchmarks/mel.py times each against HF).
`streaming_mel` makes the same frames incrementally through the same per-frame code (`_log_mel_into`, `_frames`,
`normalize_log_mel`)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from . import mel_kernel
from .errors import MediaTooSmallError
from .mel_filters import HOP, N_FFT, N_MELS, hann_window, mel_filters

_HALF = N_FFT // 2
_BINS = N_FFT // 2 + 1
_CHUNK_FRAMES = 1024  # torch and "c" kernels, one thread (benchmarks/mel.py --chunk-sweep, torch path: 1024–2048
# fastest, 65536 about 2.7× slower)
# Several threads: each op is a parallel region that waits for its slowest thread, which on a loaded machine costs
# more than the cache misses of large chunks (2 threads, load ~6: 16384 frames a chunk about 1.8× faster than 4096).
# 16384 frames hold ~65 MB of scratch.
_PARALLEL_CHUNK_FRAMES = 16384
_POOL_CHUNK_FRAMES = 4096  # compiled kernels, several threads: one task of the pool (2 threads, "c": 512–4096 frames
# within 15%, 4096 fastest; the pool is about 2× faster than one thread running torch's parallel rfft)
_MKL_CHUNK_FRAMES = 16384  # "c-mkl", one thread: it works on 64 frames at a time inside, chunks only save calls
_BAND_MELS = 16
_LOG10_FLOOR = -10.0  # Whisper clamps the mel at 1e-10 before its log10
MIN_SAMPLES = _HALF + 1  # center reflect-padding by 200 needs more than 200 samples (torch.stft fails too)


def num_mel_frames(num_samples: int) -> int:
    """Frames of a single clip: the STFT gives L//160 + 1 frames and the last one is dropped."""
    return num_samples // HOP


@lru_cache(maxsize=1)
def _one() -> torch.Tensor:
    return torch.tensor(1.0)


@lru_cache(maxsize=1)
def _bands() -> tuple[tuple[int, int, int, torch.Tensor], ...]:
    """The filters in groups of 16 mels, each with the only bins it reads: (first mel, lo, hi, [16, hi-lo]).

    A group's product reads a [hi-lo]-bin slice of the power spectrum, a sixth of the dense bank's work in all;
    the skipped entries are exact zeros, so the sums are the dense product's.
    """
    filters = mel_filters()
    bands = []
    for first in range(0, N_MELS, _BAND_MELS):
        group = filters[:, first : first + _BAND_MELS]
        used = group.ne(0).any(1).nonzero()[:, 0]
        lo, hi = int(used.min()), int(used.max()) + 1
        bands.append((first, lo, hi, group[lo:hi].t().contiguous()))
    return tuple(bands)


def _frames(wave: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Frames start..stop-1 of the center-reflect-padded wave, as a [n, 400] view (a copy at the two edges)."""
    lo, hi = start * HOP - _HALF, (stop - 1) * HOP + _HALF
    piece = wave[max(lo, 0) : min(hi + 1, wave.numel())]  # +1: a left reflection of 200 reads sample 200
    if lo < 0 or hi > wave.numel():
        pads = (max(-lo, 0), max(hi - wave.numel(), 0))
        piece = F.pad(piece[None, None], pads, mode="reflect")[0, 0]
    return piece.unfold(0, N_FFT, HOP)


def _log_mel_into(frames: torch.Tensor, out: torch.Tensor, windowed: torch.Tensor | None,
                  power: torch.Tensor | None, *, scaled: bool = False) -> float:
    """log10 mel of raw frames [n, 400] written into out [128, n] (rows of stride ≥ n, unit column stride), or
    log10 mel / 4 + 1 when `scaled`; returns the max of the unscaled values (-inf for no frames).

    Not clamped: a mel of exactly 0 gives -inf, which the floor of `normalize_log_mel` lifts like Whisper's clamp at
    1e-10. `windowed` ([≥n, 400]) and `power` ([≥n, 201], torch path only) are scratch (None: allocated here).
    This is the only per-frame computation: the offline and the streaming front ends both call it, so a frame made
    from the same 400 samples gives the same floats whichever front end made it.
    """
    n = frames.shape[0]
    if n == 0:
        return float("-inf")
    if mel_kernel.active_kernel() != "torch":
        return mel_kernel.log_mel_into(frames, out, windowed, scaled)
    windowed = torch.empty(n, N_FFT) if windowed is None else windowed
    power = torch.empty(n, _BINS) if power is None else power
    frames = torch.mul(frames, hann_window(), out=windowed[:n])
    squares = torch.view_as_real(torch.fft.rfft(frames)).square_()
    power = torch.add(squares[..., 0], squares[..., 1], out=power[:n])
    for first, lo, hi, filters in _bands():
        torch.matmul(filters, power[:, lo:hi].t(), out=out[first : first + _BAND_MELS])
    peak = float(out.log10_().amax())
    if scaled:
        torch.add(_one(), out, alpha=0.25, out=out)  # one pass; rounds like (x + 4) / 4 (see normalize_log_mel)
    return peak


def log_mel_frames(frames: torch.Tensor) -> torch.Tensor:
    """[128, n] unclamped log10 mel (before the Whisper max-8 clamp and (x+4)/4) of raw 400-sample frames [n, 400]."""
    out = torch.empty(N_MELS, frames.shape[0])
    _log_mel_into(frames, out, None, None)
    return out


def log_mel_spectrogram(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[128, floor(L/160)] float32 log-mel of a mono 16 kHz clip, normalised like Whisper (max over the clip)."""
    wave = torch.as_tensor(wave, dtype=torch.float32).reshape(-1)
    if wave.numel() < MIN_SAMPLES:
        raise MediaTooSmallError(f"audio: {wave.numel()} samples, need at least {MIN_SAMPLES} for one mel frame")
    wave = wave.contiguous()  # a strided view (one channel of interleaved audio) is copied once, not per chunk
    log_spec = torch.empty(N_MELS, num_mel_frames(wave.numel()))
    kernel, threads = mel_kernel.active_kernel(), torch.get_num_threads()
    spans = _spans(wave.numel(), log_spec.shape[1], _chunk_frames(kernel, threads), edges_apart=kernel != "torch")
    if kernel != "torch" and threads > 1 and len(spans) > 1:  # ctypes and the rfft release the GIL
        peaks = _pool(threads, os.getpid()).map(lambda span: _fill(wave, log_spec, span, None, None), spans)
    else:
        most = max(stop - start for start, stop in spans)
        windowed = torch.empty(most, N_FFT) if kernel in ("c", "torch") else None
        power = torch.empty(most, _BINS) if kernel == "torch" else None
        peaks = [_fill(wave, log_spec, span, windowed, power) for span in spans]
    return log_spec.clamp_(min=_normalized_floor(max(peaks)))


def _fill(wave: torch.Tensor, log_spec: torch.Tensor, span: tuple[int, int], windowed: torch.Tensor | None,
          power: torch.Tensor | None) -> float:
    """Scaled log-mel of frames span[0]..span[1]-1 into their columns; returns their unscaled max."""
    start, stop = span
    return _log_mel_into(_frames(wave, start, stop), log_spec[:, start:stop], windowed, power, scaled=True)


def _spans(num_samples: int, num_frames: int, step: int, edges_apart: bool) -> list[tuple[int, int]]:
    """Chunks of at most `step` frames covering all frames. With `edges_apart` the few frames that reflect at either
    end get chunks of their own, so that every other chunk is a view of the wave, never a padded copy (the torch
    path keeps plain chunks: its sgemm rounds a frame by the chunk's shape, and the streaming tests compare it)."""
    if not edges_apart:
        return [(start, min(start + step, num_frames)) for start in range(0, num_frames, step)]
    first_inner = min(2, num_frames)  # frames 0 and 1 start before sample 0
    last_inner = max(first_inner, min(num_frames, (num_samples - _HALF) // HOP + 1))  # frame t ends at 160t + 199
    bounds = [0, *range(first_inner, last_inner, step), last_inner, num_frames]
    return [(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]


@lru_cache(maxsize=4)
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """A pool per thread count and process (a forked child cannot use its parent's threads)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="log-mel")


def _chunk_frames(kernel: str, threads: int) -> int:
    """Frames per chunk of `log_mel_spectrogram` for a kernel and torch thread count."""
    if threads > 1:
        return _PARALLEL_CHUNK_FRAMES if kernel == "torch" else _POOL_CHUNK_FRAMES
    return _MKL_CHUNK_FRAMES if kernel == "c-mkl" else _CHUNK_FRAMES


def _normalized_floor(peak: float | torch.Tensor) -> float:
    """(max(peak − 8, −10) + 4) / 4 rounded as Whisper rounds it (float32): the value every bin below it becomes.

    Whisper clamps the mel at 1e-10 before the log and then at its max − 8; on unclamped values one floor at
    max(peak − 8, −10) gives the same floats (the log is monotonic, and max(peak, −10) − 8 ≤ −10 when peak ≤ −2).
    """
    threshold = torch.as_tensor(peak, dtype=torch.float32) - 8.0
    return float((threshold.clamp(min=_LOG10_FLOOR) + 4.0) * 0.25)


def normalize_log_mel(
    log_spec: torch.Tensor, peak: float | torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Whisper's normalisation of unclamped log10 mel: (max(x, peak − 8, −10) + 4) / 4, the threshold in float32.

    Offline `peak` is the clip's max; streaming passes the running max. `out=log_spec` works in place. Scaling
    first and clamping at the scaled floor gives the same floats: x·0.25 + 1 rounds like (x + 4) / 4 (0.25 and 4
    are powers of two) and rounding is monotonic, so a value below the threshold lands at or below the floor.
    """
    if out is None:
        out = torch.empty_like(log_spec)
    return torch.mul(log_spec, 0.25, out=out).add_(1.0).clamp_(min=_normalized_floor(peak))
