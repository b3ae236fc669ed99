"""An energy-based voice activity detector: the Realtime API's `server_vad` turn detection, and the speech
segments of a transcription (`speech_spans`).

Audio is cut into 20 ms frames; a frame is voiced when its RMS level (dBFS) reaches the level that the
0..1 `threshold` maps to, linearly from -60 dBFS (0.0) to -20 dBFS (1.0): 0.5, the API's default, is
-40 dBFS, well under speech at a normal level and well over a quiet room. Speech starts at the first
voiced frame and stops once `silence_duration_ms` of unvoiced frames follow the last voiced one. Events
carry absolute sample indices (counted from the first sample fed), so the caller can cut its own audio
buffer at them; the prefix padding is the caller's to apply, as `prefix_samples`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_MS = 20
_QUIET_DB, _LOUD_DB = -60.0, -20.0


def threshold_db(threshold: float) -> float:
    """The RMS level in dBFS that a 0..1 VAD threshold stands for."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    return _QUIET_DB + threshold * (_LOUD_DB - _QUIET_DB)


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "started" or "stopped"
    sample: int  # started: first voiced sample; stopped: where the silence reached silence_duration_ms


class EnergyVad:
    def __init__(self, sample_rate: int, threshold: float = 0.5, prefix_padding_ms: int = 300,
                 silence_duration_ms: int = 500) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if prefix_padding_ms < 0 or silence_duration_ms < FRAME_MS:
            raise ValueError(f"prefix_padding_ms must be >= 0 and silence_duration_ms >= {FRAME_MS}, "
                             f"got {prefix_padding_ms} and {silence_duration_ms}")
        self.sample_rate = sample_rate
        self.level_db = threshold_db(threshold)
        self.frame = sample_rate * FRAME_MS // 1000
        self.prefix_samples = sample_rate * prefix_padding_ms // 1000
        self.silence_frames = -(-silence_duration_ms // FRAME_MS)  # whole frames, rounded up
        self.speaking = False
        self._fed = 0  # samples fed so far
        self._pending = np.zeros(0, dtype=np.float32)  # the start of a frame not yet complete
        self._quiet_frames = 0  # unvoiced frames since the last voiced one, while speaking

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Samples as int16 PCM or floats in [-1, 1]; the speech starts and stops they complete, in order."""
        audio = samples.astype(np.float32) / 32768.0 if samples.dtype == np.int16 else samples.astype(np.float32)
        first = self._fed - len(self._pending)  # sample index of buffer[0]
        buffer = np.concatenate([self._pending, audio])
        self._fed += len(audio)
        whole = len(buffer) // self.frame * self.frame
        self._pending = buffer[whole:]
        events: list[VadEvent] = []
        for index, level in enumerate(frame_levels_db(buffer[:whole], self.frame)):
            start = first + index * self.frame
            voiced = level >= self.level_db
            if not self.speaking and voiced:
                self.speaking, self._quiet_frames = True, 0
                events.append(VadEvent("started", start))
            elif self.speaking:
                self._quiet_frames = 0 if voiced else self._quiet_frames + 1
                if self._quiet_frames == self.silence_frames:
                    self.speaking = False
                    events.append(VadEvent("stopped", start + self.frame))
        return events

    def reset(self) -> None:
        """Forget any speech in progress (the buffer was committed or cleared); sample indices go on."""
        self.speaking = False
        self._quiet_frames = 0


def frame_levels_db(samples: np.ndarray, frame: int) -> np.ndarray:
    """RMS level in dBFS of each whole `frame`-sample frame of float samples in [-1, 1]."""
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame)
    power = np.mean(np.square(frames, dtype=np.float64), axis=1)
    return 10.0 * np.log10(np.maximum(power, 1e-12))


@dataclass(frozen=True)
class SpeechSpan:
    start: int  # first sample (prefix padding included)
    end: int  # one past the last sample
    voiced_fraction: float  # share of its frames at or above the threshold level


def speech_spans(wave: np.ndarray, sample_rate: int, max_samples: int, threshold: float = 0.5,
                 prefix_padding_ms: int = 300, silence_duration_ms: int = 500) -> list[SpeechSpan]:
    """The speech in a whole recording: each stretch the detector finds (from its start less the prefix padding
    to where the silence after it reached `silence_duration_ms`), cut into equal parts of at most max_samples."""
    vad = EnergyVad(sample_rate, threshold, prefix_padding_ms, silence_duration_ms)
    bounds, start = [], None
    for event in vad.feed(wave):
        if event.kind == "started":
            start = max(0, event.sample - vad.prefix_samples)
        else:
            bounds.append((start, event.sample))
    if vad.speaking:
        bounds.append((start, len(wave)))
    spans = []
    for first, last in bounds:
        parts = -(-(last - first) // max_samples)
        edges = [first + (last - first) * i // parts for i in range(parts + 1)]
        for a, b in zip(edges, edges[1:]):
            levels = frame_levels_db(wave[a:b].astype(np.float32), vad.frame)
            voiced = float(np.mean(levels >= vad.level_db)) if len(levels) else 0.0
            spans.append(SpeechSpan(a, b, voiced))
    return spans
