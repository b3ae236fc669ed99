from functools import lru_cache

import numpy as np
import pytest
import torch

from omnistream.multimodal.audio import load_audio
from omnistream.multimodal.errors import MediaError, MediaTooSmallError
from omnistream.multimodal.mel import _frames, log_mel_frames, log_mel_spectrogram
from omnistream.multimodal.placeholders import audio_token_count
from omnistream.multimodal.streaming_mel import StreamingAudioWindows, StreamingLogMel, normalize_log_mel

TOL = 1e-5  # seen: ≤ 9.5e-7 on log10 values (MKL sgemm rounds a row differently with the batch size)


def speech_like(length: int, seed: int, loud_at: float | None = None) -> np.ndarray:
    """Quiet noise plus a tone, with an optional loud burst starting at `loud_at` (fraction of the clip)."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 16000
    wave = 0.05 * np.sin(2 * np.pi * 300 * t) * (1 + np.sin(2 * np.pi * 0.7 * t)) + 1e-4 * rng.standard_normal(length)
    if loud_at is not None:
        first = int(loud_at * length)
        wave[first : first + 4000] += 0.9 * np.sin(2 * np.pi * 1000 * t[first : first + 4000])
    return wave.astype(np.float32)


@lru_cache(maxsize=8)
def offline_unclamped(length: int, seed: int, loud_at: float | None = None) -> torch.Tensor:
    """log_mel_spectrogram's values before its clamp and scaling (its own framing and per-frame code)."""
    wave = torch.from_numpy(speech_like(length, seed, loud_at))
    return log_mel_frames(_frames(wave, 0, length // 160))


def chunk_sizes(kind: str, length: int, rng: np.random.Generator):
    done = 0
    while done < length:
        n = {"100ms": 1600, "random": int(rng.integers(1, 5001)), "all": length, "single": 1}[kind]
        yield done, min(n, length - done)
        done += n


CASES = [(n, kind) for n in (201, 3000, 12345, 192000, 192077) for kind in ("100ms", "random", "all")]


@pytest.mark.parametrize("length,kind", CASES + [(3000, "single"), (12345, "single")])
def test_frames_equal_offline(length, kind):
    wave = speech_like(length, seed=length)
    stream, parts = StreamingLogMel(), []
    for first, n in chunk_sizes(kind, length, np.random.default_rng(length)):
        parts.append(stream.feed(wave[first : first + n]))
        assert stream.num_frames < 2 or stream.buffered_samples < 400  # bounded: never the whole stream
        # a frame is out as soon as its 400 samples exist (201 for the reflected start), never earlier
        assert stream.num_frames == ((first + n - 200) // 160 + 1 if first + n > 200 else 0)
    parts.append(stream.finish())
    frames = torch.cat(parts, dim=1)
    reference = offline_unclamped(length, length)
    assert frames.shape == reference.shape == (128, length // 160) and stream.num_frames == length // 160
    assert (frames - reference).abs().max().item() <= TOL
    assert stream.running_max == pytest.approx(reference.max().item(), abs=TOL)
    # the offline public function is this normalisation of these values
    assert torch.equal(normalize_log_mel(reference, reference.max()), log_mel_spectrogram(wave))


def stream_windows(wave, window_frames, rng, chunk=None):
    windows_out = StreamingAudioWindows(window_frames)
    windows = []
    for first, n in chunk_sizes("random" if chunk is None else chunk, wave.size, rng):
        windows += windows_out.feed(wave[first : first + n])
    return windows + windows_out.flush()


def check_partition(windows, num_frames, window_frames):
    assert [w.start_frame for w in windows] == [0] + [w.stop_frame for w in windows[:-1]]
    assert windows[-1].stop_frame == num_frames
    assert all(w.num_frames == window_frames for w in windows[:-1]) and 0 < windows[-1].num_frames <= window_frames
    assert sum(w.num_tokens for w in windows) == audio_token_count(num_frames)


def test_windows_loudest_first_equal_offline():
    length = 12 * 16000 + 3000
    wave = speech_like(length, seed=7, loud_at=0.0)
    offline = log_mel_spectrogram(wave)
    windows = stream_windows(wave, 800, np.random.default_rng(0), chunk="100ms")
    check_partition(windows, length // 160, 800)
    assert len(windows) == 2  # 800 + 418 frames
    peak = offline_unclamped(length, 7, 0.0).max().item()
    for w in windows:
        assert w.running_max == pytest.approx(peak, abs=TOL)
        assert (w.features - offline[:, w.start_frame : w.stop_frame]).abs().max().item() <= TOL


def test_windows_loudest_late_bounded():
    length = 11 * 16000 + 77
    wave = speech_like(length, seed=8, loud_at=0.85)
    offline = log_mel_spectrogram(wave)
    unclamped = offline_unclamped(length, 8, 0.85)
    global_max = unclamped.max().item()
    windows = stream_windows(wave, 300, np.random.default_rng(1))
    check_partition(windows, length // 160, 300)
    differing = 0
    for w in windows:
        ours, theirs = w.features, offline[:, w.start_frame : w.stop_frame]
        gap = theirs - ours  # the running max is lower, so the clamp floor is lower: ours ≤ offline
        assert gap.min().item() >= -TOL
        assert gap.max().item() <= (global_max - w.running_max) / 4 + TOL
        above_floor = unclamped[:, w.start_frame : w.stop_frame] >= global_max - 8  # offline not clamped there
        assert gap[above_floor].abs().max().item() <= TOL
        differing += int(gap.max().item() > 0.1)
    assert windows[0].running_max < global_max - 1 and differing >= 2  # the late case really differs early on
    assert windows[-1].running_max == pytest.approx(global_max, abs=TOL)
    assert (windows[-1].features - offline[:, windows[-1].start_frame :]).abs().max().item() <= TOL


@pytest.mark.parametrize("rate,as_bytes", [(24000, True), (48000, False)])
def test_other_rates_resampled_as_offline(rate, as_bytes):
    rng = np.random.default_rng(rate)
    t = np.arange(3 * rate + 11) / rate
    pcm = ((0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)) * 32767).astype(np.int16)
    data = pcm.tobytes() if as_bytes else pcm.astype(np.float32) / 32768
    stream, parts, first = StreamingLogMel(sample_rate=rate), [], 0
    while first < len(data):  # byte chunks split samples in half at random
        n = int(rng.integers(1, 9000))
        parts.append(stream.feed(data[first : first + n]))
        first += n
    parts.append(stream.finish())
    frames = torch.cat(parts, dim=1)
    resampled = torch.from_numpy(load_audio((pcm, rate)))
    reference = log_mel_frames(_frames(resampled, 0, resampled.numel() // 160))
    assert frames.shape == reference.shape  # the same 16 kHz length as load_audio
    assert (frames - reference).abs().max().item() <= TOL  # seen: ≤ 4.8e-7 (the samples equal load_audio's)


def test_errors():
    with pytest.raises(MediaTooSmallError):
        StreamingLogMel().finish()
    short = StreamingLogMel()
    assert short.feed(np.zeros(200, np.float32)).shape == (128, 0)
    with pytest.raises(MediaTooSmallError):
        short.finish()
    done = StreamingLogMel()
    assert done.feed(np.zeros(201, np.float32)).shape == (128, 1)  # frame 0 needs sample 200 (its reflection)
    assert done.finish().shape == (128, 0)
    with pytest.raises(RuntimeError):
        done.feed(np.zeros(10, np.float32))
    odd = StreamingLogMel()
    odd.feed(bytes(1001))
    with pytest.raises(MediaError):
        odd.finish()
    with pytest.raises(MediaError):
        StreamingLogMel().feed(np.zeros((2, 100), np.float32))
    for bad in (0, 50, 150, 900):
        with pytest.raises(ValueError):
            StreamingAudioWindows(bad)
