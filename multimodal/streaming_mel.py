"""Streaming log-mel: speech in as it arrives (any chunking, 16 kHz or resampled, float or PCM16), mel frames and
complete encoder windows out as soon as their samples exist. It never holds the whole stream and never encodes.

Exactness contract (tested in tests/multimodal/test_streaming_mel.py):
- Frames. Frame t is centred on sample 160·t and reads samples 160·t − 200 … 160·t + 199, so `feed` emits it once
  160·t + 200 samples exist (frames 0 and 1 read the reflected start, known once 201 samples exist); `finish` emits
  the rest with reflect padding at the true end. Every frame is made from the same 400 samples by the same code as
  `mel.log_mel_spectrogram` (`mel._frames` / `mel._log_mel_into`), so the concatenated unclamped log10 frames equal
  the offline ones: floor(L/160) of them (the last STFT frame dropped, like Whisper), none twice, bit for bit with
  the compiled kernel (mel_kernel: a frame's floats never depend on its batch). With the pure-torch fallback they
  agree to ≤ 1e-5, not always bit-exact: MKL's sgemm rounds a frame's mel product differently depending on how
  the batch is blocked (seen: ≤ 9.5e-7, about 1 ulp).
- Normalisation. Whisper clamps with the clip's max, max(x, max − 8), which a stream does not know yet; streaming
  uses the running max m_w (max over all frames emitted when window w is handed out). With the global max M ≥ m_w:
  streamed = offline wherever x ≥ M − 8 (offline is above its floor (M − 4)/4 there), and everywhere
  0 ≤ offline − streamed ≤ (M − m_w)/4. So windows are exactly offline when the loudest frame comes first
  (m_w = M from the first window on); otherwise only bins below M − 8 (≥ 80 dB under the peak) differ.
- Other rates: input at another rate goes through one PyAV resampler fed incrementally (libswresample, the same
  one `audio.load_audio` uses), so the 16 kHz stream has the same length as `load_audio((array, rate))` and its
  samples agree up to the resampler's float rounding (the test reports the difference).
Memory: the retained samples are those from frame `next`'s first sample on (< 400 after each `feed`) plus, before
frame 2, the first samples needed for the reflection.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F

from .audio import check_sample_rate
from .errors import MediaError, MediaTooSmallError
from .mel import (
    _BINS,
    _CHUNK_FRAMES,
    _HALF,
    MIN_SAMPLES,
    _frames,
    _log_mel_into,
    normalize_log_mel,
)
from .mel_filters import HOP, N_FFT, N_MELS, SAMPLE_RATE
from .placeholders import AUDIO_CHUNK_FRAMES, audio_token_count

__all__ = ["AudioWindow", "StreamingAudioWindows", "StreamingLogMel", "StreamingResampler", "normalize_log_mel"]

Samples = np.ndarray | torch.Tensor | bytes | bytearray | memoryview
MAX_WINDOW_FRAMES = 800  # the checkpoint's n_window_infer


class StreamingResampler:
    """Mono float32 at `sample_rate` → 16 kHz, chunk by chunk, with PyAV (libswresample, as `load_audio`)."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = check_sample_rate(sample_rate)
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._pts = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next float32 samples; returns the 16 kHz samples ready so far (the filter lags a little)."""
        if samples.size == 0:
            return np.empty(0, np.float32)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32)[None], "flt", "mono")
        frame.sample_rate, frame.pts = self.sample_rate, self._pts
        self._pts += samples.size
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """The samples still inside the filter, at the end of the stream."""
        return self._collect(self._resampler.resample(None))

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> np.ndarray:
        if not frames:
            return np.empty(0, np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)


class StreamingLogMel:
    """Unclamped log10 mel frames [128, n] of a growing mono stream; frame t as soon as samples 0..160·t+199 exist.

    `feed` takes float arrays (numpy or torch), signed-integer arrays (scaled like `load_audio`) or PCM16 bytes
    (little-endian int16, split anywhere) at `sample_rate`; `finish` ends the stream. Concatenated, their outputs
    are the offline unclamped frames (see the module docstring); normalise them with `normalize_log_mel` and
    `running_max`.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self._resampler = None if sample_rate == SAMPLE_RATE else StreamingResampler(sample_rate)
        self._odd_byte = b""  # half of a PCM16 sample split across two chunks
        self._buf = torch.empty(0)  # samples base .. num_samples - 1 (16 kHz)
        self._base = 0
        self._next = 0  # the next frame to emit
        self._peak = float("-inf")
        self._finished = False

    @property
    def num_samples(self) -> int:
        """16 kHz samples received so far."""
        return self._base + self._buf.numel()

    @property
    def num_frames(self) -> int:
        """Frames emitted so far."""
        return self._next

    @property
    def running_max(self) -> float:
        """Max unclamped log10 value over all frames emitted so far (-inf before the first)."""
        return self._peak

    @property
    def buffered_samples(self) -> int:
        """Samples held right now (the memory bound: < 400 after each feed, once past frame 2)."""
        return self._buf.numel()

    def feed(self, samples: Samples) -> torch.Tensor:
        """Add samples; returns the frames they completed, [128, n] unclamped log10 mel (n may be 0)."""
        if self._finished:
            raise RuntimeError("StreamingLogMel: feed after finish")
        wave = self._to_float(samples)
        if self._resampler is not None:
            wave = self._resampler.push(wave)
        self._append(wave)
        available = self.num_samples
        stop = (available - _HALF) // HOP + 1 if available >= MIN_SAMPLES else 0  # last frame reads sample 160t+199
        return self._emit(stop)

    def finish(self) -> torch.Tensor:
        """End of stream: the remaining frames, reflect-padded at the true end, so the total is floor(L/160)."""
        if self._finished:
            raise RuntimeError("StreamingLogMel: finish called twice")
        self._finished = True
        if self._odd_byte:
            raise MediaError("audio: PCM16 stream ends in half a sample (odd number of bytes)")
        if self._resampler is not None:
            self._append(self._resampler.flush())
        if self.num_samples < MIN_SAMPLES:
            raise MediaTooSmallError(
                f"audio: {self.num_samples} samples, need at least {MIN_SAMPLES} for one mel frame")
        return self._emit(self.num_samples // HOP)

    def _to_float(self, samples: Samples) -> np.ndarray:
        if isinstance(samples, (bytes, bytearray, memoryview)):
            data = self._odd_byte + bytes(samples)
            whole = len(data) - len(data) % 2
            self._odd_byte = data[whole:]
            samples = np.frombuffer(data[:whole], dtype="<i2")
        elif isinstance(samples, torch.Tensor):
            samples = samples.detach().cpu().numpy()
        samples = np.asarray(samples)
        if samples.ndim != 1:
            raise MediaError(f"audio: a stream takes 1-D mono chunks, got shape {samples.shape}")
        if np.issubdtype(samples.dtype, np.floating):
            return samples.astype(np.float32, copy=False)
        if np.issubdtype(samples.dtype, np.signedinteger):
            return (samples / float(np.iinfo(samples.dtype).max + 1)).astype(np.float32)
        raise MediaError(f"audio: unsupported sample dtype {samples.dtype}; use float, signed integers or PCM16 bytes")

    def _append(self, wave: np.ndarray) -> None:
        if wave.size:
            self._buf = torch.cat([self._buf, torch.from_numpy(np.ascontiguousarray(wave))])

    def _frames_at(self, start: int, stop: int) -> torch.Tensor:
        """Frames start..stop-1 as [n, 400] from the held samples; right reflection only after `finish`."""
        if self._base == 0:  # the buffer is the true start of the signal: the offline framing, reflection included
            return _frames(self._buf, start, stop)
        lo, hi = start * HOP - _HALF - self._base, (stop - 1) * HOP + _HALF - self._base
        piece = self._buf[lo:hi]
        if hi > self._buf.numel():  # finish: reflect at the true end, as offline
            piece = F.pad(piece[None, None], (0, hi - self._buf.numel()), mode="reflect")[0, 0]
        return piece.unfold(0, N_FFT, HOP)

    def _emit(self, stop: int) -> torch.Tensor:
        n = max(stop - self._next, 0)
        out = torch.empty(N_MELS, n)
        if n == 0:
            return out
        windowed = torch.empty(min(n, _CHUNK_FRAMES), N_FFT)
        power = torch.empty(windowed.shape[0], _BINS)
        for first in range(0, n, _CHUNK_FRAMES):
            count = min(_CHUNK_FRAMES, n - first)
            start = self._next + first
            chunk = out[:, first : first + count]
            _log_mel_into(self._frames_at(start, start + count), chunk, windowed, power)
            self._peak = max(self._peak, float(chunk.amax()))
        self._next = stop
        if stop >= 2:  # frames 0 and 1 reflect the first 201 samples; later frames need 160t-200 on
            keep_from = stop * HOP - _HALF
            self._buf = self._buf[keep_from - self._base :].clone()
            self._base = keep_from
        return out


@dataclass(frozen=True)
class AudioWindow:
    """One encoder attention window: normalised mel of frames [start_frame, start_frame + n) of the stream."""

    features: torch.Tensor  # [128, n] float32, (max(x, running_max - 8) + 4) / 4
    start_frame: int
    running_max: float  # the max its clamp used (the stream's running max when it was handed out)

    @property
    def num_frames(self) -> int:
        return self.features.shape[1]

    @property
    def stop_frame(self) -> int:
        return self.start_frame + self.num_frames

    @property
    def num_tokens(self) -> int:
        """Audio embeddings the AuT encoder makes from this window (13 per full 100 frames)."""
        return audio_token_count(self.num_frames)


class StreamingAudioWindows:
    """Samples in, complete `window_frames`-frame encoder windows out (normalised with the running max), and the
    last partial window at `flush` (end of speech). Window sizes are whole 1 s chunks, so the windows' token counts
    add up to the offline clip's."""

    def __init__(self, window_frames: int = MAX_WINDOW_FRAMES, sample_rate: int = SAMPLE_RATE) -> None:
        if window_frames % AUDIO_CHUNK_FRAMES or not AUDIO_CHUNK_FRAMES <= window_frames <= MAX_WINDOW_FRAMES:
            raise ValueError(f"window_frames must be a multiple of {AUDIO_CHUNK_FRAMES} in "
                             f"{AUDIO_CHUNK_FRAMES}..{MAX_WINDOW_FRAMES}, got {window_frames}")
        self.window_frames = window_frames
        self.mel = StreamingLogMel(sample_rate)
        self._pending: list[torch.Tensor] = []  # emitted frames not yet in a window
        self._pending_frames = 0
        self._start = 0  # first frame of the next window

    def feed(self, samples: Samples) -> list[AudioWindow]:
        """Add samples; returns the windows they completed (usually none or one)."""
        return self._take(self.mel.feed(samples), final=False)

    def flush(self) -> list[AudioWindow]:
        """End of speech: the remaining full windows and the last partial one."""
        return self._take(self.mel.finish(), final=True)

    def _take(self, frames: torch.Tensor, final: bool) -> list[AudioWindow]:
        if frames.shape[1]:
            self._pending.append(frames)
            self._pending_frames += frames.shape[1]
        windows = []
        while self._pending_frames >= self.window_frames or (final and self._pending_frames):
            pending = torch.cat(self._pending, dim=1) if len(self._pending) > 1 else self._pending[0]
            n = min(self.window_frames, self._pending_frames)
            peak = self.mel.running_max
            windows.append(AudioWindow(normalize_log_mel(pending[:, :n], peak), self._start, peak))
            rest = pending[:, n:]
            self._pending = [rest] if rest.shape[1] else []
            self._pending_frames, self._start = rest.shape[1], self._start + n
        return windows
