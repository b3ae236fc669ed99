"""The Realtime server VAD on synthesised signals: speech-like bursts (a voiced harmonic tone with a syllable
envelope), silence and low noise; where speech starts and stops, the threshold, chunking independence."""

from __future__ import annotations

import numpy as np
import pytest

from omnistream.multimodal.vad import FRAME_MS, EnergyVad, threshold_db

RATE = 16_000


def speech(seconds: float, level: float = 0.3, seed: int = 0) -> np.ndarray:
    """A speech-like signal: harmonics of a wandering pitch, amplitude-modulated at a syllable rate (4 Hz)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 4 * t))
    signal = voiced * envelope + 0.05 * rng.standard_normal(len(t))
    return (level * signal / np.max(np.abs(signal))).astype(np.float32)


def silence(seconds: float, noise_level: float = 0.0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (noise_level * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def run(vad: EnergyVad, audio: np.ndarray, chunk: int) -> list[tuple[str, int]]:
    found = []
    for start in range(0, len(audio), chunk):
        found += [(e.kind, e.sample) for e in vad.feed(audio[start:start + chunk])]
    return found


def test_speech_between_silences_starts_and_stops_where_it_should():
    audio = np.concatenate([silence(0.5, 0.001), speech(1.0), silence(1.0, 0.001)])
    found = run(EnergyVad(RATE, silence_duration_ms=500), audio, chunk=RATE // 10)
    assert [kind for kind, _ in found] == ["started", "stopped"]
    started, stopped = found[0][1], found[1][1]
    frame = RATE * FRAME_MS // 1000
    assert abs(started - int(0.5 * RATE)) <= frame  # within one frame of the speech onset
    assert abs(stopped - int(2.0 * RATE)) <= 2 * frame  # speech end (1.5 s) + 500 ms of silence


def test_pauses_shorter_than_the_silence_duration_do_not_end_the_turn():
    audio = np.concatenate([speech(0.6), silence(0.3), speech(0.6, seed=3), silence(0.8)])
    found = run(EnergyVad(RATE, silence_duration_ms=500), audio, chunk=480)
    assert [kind for kind, _ in found] == ["started", "stopped"]
    shorter = run(EnergyVad(RATE, silence_duration_ms=200), audio, chunk=480)
    assert [kind for kind, _ in shorter] == ["started", "stopped", "started", "stopped"]


def test_silence_and_quiet_noise_never_start_speech():
    for audio in (silence(3.0), silence(3.0, noise_level=0.003)):
        vad = EnergyVad(RATE)
        assert run(vad, audio, chunk=1600) == [] and not vad.speaking


def test_threshold_maps_0_to_1_onto_rising_levels():
    assert threshold_db(0.0) < threshold_db(0.5) < threshold_db(1.0)
    quiet_speech = np.concatenate([speech(1.0, level=0.02), silence(1.0)])
    assert run(EnergyVad(RATE, threshold=0.2), quiet_speech, 1600)  # a sensitive VAD hears it
    assert run(EnergyVad(RATE, threshold=0.8), quiet_speech, 1600) == []  # a strict one does not
    with pytest.raises(ValueError, match="threshold"):
        EnergyVad(RATE, threshold=1.5)


def test_events_do_not_depend_on_chunking_or_sample_type():
    audio = np.concatenate([silence(0.3), speech(0.8), silence(0.7), speech(0.5, seed=5), silence(0.7)])
    whole = run(EnergyVad(RATE), audio, chunk=len(audio))
    assert [kind for kind, _ in whole] == ["started", "stopped", "started", "stopped"]
    assert run(EnergyVad(RATE), audio, chunk=777) == whole
    pcm16 = np.round(audio * 32767).astype(np.int16)
    assert run(EnergyVad(RATE), pcm16, chunk=1600) == whole


def test_prefix_padding_and_other_rates():
    vad = EnergyVad(24_000, prefix_padding_ms=300)
    assert vad.prefix_samples == 7200 and vad.frame == 480
    with pytest.raises(ValueError, match="silence_duration_ms"):
        EnergyVad(RATE, silence_duration_ms=5)
