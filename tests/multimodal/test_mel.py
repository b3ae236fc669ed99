import logging
import shutil

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from omnistream.multimodal import mel_kernel
from omnistream.multimodal.errors import MediaTooSmallError
from omnistream.multimodal.mel import _frames, log_mel_frames, log_mel_spectrogram, num_mel_frames
from omnistream.multimodal.streaming_mel import StreamingLogMel

EXTRACTOR = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400)
HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))
# torch's x86 builds link MKL in and export its DFTI functions: there the kernel must call MKL itself
HAS_MKL = torch.backends.mkl.is_available()
EXPECTED = {"auto": "c-mkl" if HAS_COMPILER and HAS_MKL else "c" if HAS_COMPILER else "torch",
            "c": "c" if HAS_COMPILER else "torch", "torch": "torch"}


def hf_features(wave: np.ndarray) -> torch.Tensor:
    out = EXTRACTOR(wave, sampling_rate=16000, return_tensors="pt", padding="longest", truncation=False)
    return out["input_features"][0]


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mel-kernel-cache")


def use_kernel(monkeypatch, cache_dir, choice: str) -> None:
    """Reload the kernel choice with OMNISTREAM_MEL_KERNEL=choice and a private cache dir."""
    monkeypatch.setenv("OMNISTREAM_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv(mel_kernel.ENV_KERNEL, choice)
    mel_kernel._load.cache_clear()


@pytest.fixture(params=["auto", "c", "torch"])
def kernel(request, monkeypatch, kernel_cache):
    """Each test with the kernel picked by default (MKL called from C where available), with the compiled passes
    around torch.fft.rfft, and with the forced torch fallback."""
    use_kernel(monkeypatch, kernel_cache, request.param)
    assert mel_kernel.active_kernel() == EXPECTED[request.param]
    yield EXPECTED[request.param]
    mel_kernel._load.cache_clear()


def tone_and_noise(length: int) -> np.ndarray:
    rng = np.random.default_rng(length)
    t = np.arange(length) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.linspace(0, 1, length) + 0.01 * rng.standard_normal(length))


@pytest.mark.parametrize("length", [201, 1000, 40000, 40100, 40159, 40160, 160 * 1024, 160 * 1024 + 37,
                                    160 * 4096, 160 * 4096 + 37])
def test_matches_whisper_feature_extractor(kernel, length):
    wave = tone_and_noise(length).astype(np.float32)
    ours = log_mel_spectrogram(wave)
    assert ours.dtype == torch.float32 and ours.shape == (128, length // 160) == (128, num_mel_frames(length))
    assert (ours - hf_features(wave)).abs().max().item() < 1e-4


def brown_noise(length: int) -> np.ndarray:
    """A steep 1/f² spectrum: the top bins are ~80 dB under the bottom ones, right at the max − 8 floor."""
    return np.cumsum(np.random.default_rng(3).standard_normal(length)) * 1e-3


def level_steps(length: int) -> np.ndarray:
    """White noise whose level jumps by up to 70 dB every second."""
    rng = np.random.default_rng(4)
    levels = np.exp(rng.uniform(-8, 0, length // 16000 + 1)).repeat(16000)[:length]
    return rng.standard_normal(length) * levels


@pytest.mark.parametrize("name,make", [
    ("digital zeros", np.zeros),
    ("very quiet", lambda n: 1e-7 * np.random.default_rng(1).standard_normal(n)),  # every mel under 1e-10
    ("subnormal samples", lambda n: 1e-40 * np.random.default_rng(2).standard_normal(n)),
    ("zeros then a click", lambda n: np.where(np.arange(n) == n // 2, 0.5, 0.0)),
    ("brown noise", brown_noise),
    ("level steps", level_steps),
    ("full scale square wave", lambda n: np.sign(np.sin(2 * np.pi * 250 * np.arange(n) / 16000))),
])
def test_hard_clips_match_whisper(kernel, name, make):
    wave = make(160 * 3000 + 19).astype(np.float32)
    ours, reference = log_mel_spectrogram(wave), hf_features(wave)
    assert (ours - reference).abs().max().item() < 1e-4


def test_silence_and_torch_input(kernel):
    wave = torch.zeros(16000)
    ours = log_mel_spectrogram(wave)
    assert torch.equal(ours, hf_features(wave.numpy()))


def test_strided_and_float64_input(kernel):
    stereo = np.stack([tone_and_noise(160 * 1500 + 3), np.zeros(160 * 1500 + 3)], axis=1)  # float64, interleaved
    left = stereo[:, 0]
    assert not left.flags.c_contiguous
    assert torch.equal(log_mel_spectrogram(left), log_mel_spectrogram(np.ascontiguousarray(left, np.float32)))


def test_too_short():
    with pytest.raises(MediaTooSmallError):
        log_mel_spectrogram(np.zeros(200, np.float32))


@pytest.mark.parametrize("threads", [1, 2])
def test_silence_then_burst_with_either_chunking(kernel, threads):
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
    # the same frames are clamped; the floor itself (peak − 8) may differ by the peak's last bit (< 1e-4 above)
    assert torch.equal(ours == ours.min(), reference == floor)


def test_kernels_agree_on_unclamped_frames(monkeypatch, kernel_cache):
    """The compiled kernels give the same floats (MKL called from C or through torch.fft.rfft), and the same
    unclamped log10 frames as the torch path up to float rounding (zeros give -inf in all)."""
    wave = torch.from_numpy(tone_and_noise(160 * 700).astype(np.float32))
    wave[: 160 * 50] = 0.0
    results = {}
    for choice in ("auto", "c", "torch"):
        use_kernel(monkeypatch, kernel_cache, choice)
        results[choice] = log_mel_frames(_frames(wave, 0, 700))
    mel_kernel._load.cache_clear()
    assert torch.equal(results["auto"], results["c"])
    compiled, fallback = results["auto"], results["torch"]
    assert torch.equal(compiled.isinf(), fallback.isinf()) and compiled.isinf().any()
    finite = fallback.isfinite()
    assert (compiled[finite] - fallback[finite]).abs().max().item() < 1e-5


def test_streaming_frames_bit_identical_to_offline(kernel):
    """The per-frame code does not depend on how frames are batched, so streamed frames equal offline ones exactly
    with the compiled kernel (the torch fallback is only within sgemm rounding: see test_streaming_mel)."""
    length = 160 * 2500 + 77
    wave = tone_and_noise(length).astype(np.float32)
    stream, parts, first = StreamingLogMel(), [], 0
    rng = np.random.default_rng(0)
    while first < length:
        n = int(rng.integers(1, 7000))
        parts.append(stream.feed(wave[first : first + n]))
        first += n
    parts.append(stream.finish())
    streamed = torch.cat(parts, dim=1)
    offline = log_mel_frames(_frames(torch.from_numpy(wave), 0, length // 160))
    if kernel != "torch":
        assert torch.equal(streamed, offline)
    else:
        assert (streamed - offline).abs().max().item() <= 1e-5


def test_compile_failure_falls_back_to_torch(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    use_kernel(monkeypatch, tmp_path, "auto")
    try:
        with caplog.at_level(logging.WARNING, logger=mel_kernel.__name__):
            assert mel_kernel.active_kernel() == "torch"
        assert any("compiled kernel unavailable" in r.getMessage() for r in caplog.records)
        wave = tone_and_noise(40000).astype(np.float32)
        assert (log_mel_spectrogram(wave) - hf_features(wave)).abs().max().item() < 1e-4
        assert not list(tmp_path.glob("*.so*"))  # no half-written library left behind
    finally:
        mel_kernel._load.cache_clear()


def test_compiled_once_into_the_cache_dir(monkeypatch, tmp_path):
    use_kernel(monkeypatch, tmp_path, "auto")
    try:
        assert mel_kernel.active_kernel() == EXPECTED["auto"]
        if not HAS_COMPILER:
            return
        (library,) = tmp_path.glob("mel_kernel-*.so")
        stamp = library.stat().st_mtime_ns
        mel_kernel._load.cache_clear()
        assert mel_kernel.active_kernel() == EXPECTED["auto"] and library.stat().st_mtime_ns == stamp  # reused
        assert [p.name for p in tmp_path.iterdir()] == [library.name]
    finally:
        mel_kernel._load.cache_clear()


def test_without_mkl_the_kernel_calls_torch_rfft(monkeypatch, kernel_cache):
    monkeypatch.setattr(mel_kernel, "_mkl_addresses", lambda: None)
    use_kernel(monkeypatch, kernel_cache, "auto")
    try:
        assert mel_kernel.active_kernel() == EXPECTED["c"]
        wave = tone_and_noise(40000).astype(np.float32)
        assert (log_mel_spectrogram(wave) - hf_features(wave)).abs().max().item() < 1e-4
    finally:
        mel_kernel._load.cache_clear()


def test_unknown_kernel_choice_is_an_error(monkeypatch, tmp_path):
    use_kernel(monkeypatch, tmp_path, "fast")
    try:
        with pytest.raises(ValueError, match="OMNISTREAM_MEL_KERNEL"):
            mel_kernel.active_kernel()
    finally:
        mel_kernel._load.cache_clear()
