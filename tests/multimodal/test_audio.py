import io

import numpy as np
import pytest
import torch

from omnistream.multimodal.audio import has_audio_stream, load_audio
from omnistream.multimodal.errors import EmptyMediaError, MediaDecodeError, MediaError
from tests.multimodal.media import encode_audio, encode_video, tone

FORMATS = [("wav", "pcm_s16le", 44100), ("flac", "flac", 44100), ("mp3", "libmp3lame", 44100),
           ("ogg", "libopus", 48000), ("ipod", "aac", 44100)]  # opus encodes only at 48 kHz


def correlation_with_tone(wave: np.ndarray) -> float:
    reference = tone(16000, wave.size / 16000)[: wave.size]
    core = slice(1600, wave.size - 1600)  # skip codec edges
    return float(np.corrcoef(wave[core], reference[core])[0, 1])


@pytest.mark.parametrize("container_format,codec,rate", FORMATS)
def test_decode_formats_to_mono_16k(container_format, codec, rate):
    data = encode_audio(container_format, codec, rate=rate, seconds=1.0)
    wave = load_audio(data)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.size - 16000) <= 16 * 5  # within 5 ms
    assert correlation_with_tone(wave) > 0.95
    assert 0.4 < np.abs(wave[1600:-1600]).max() < 0.6  # channel mean, not a +3 dB sum


def test_sources_path_filelike_and_memoryview(tmp_path):
    data = encode_audio("wav", "pcm_s16le")
    path = tmp_path / "a.wav"
    path.write_bytes(data)
    reference = load_audio(data)
    for source in (path, str(path), io.BytesIO(data), memoryview(data), bytearray(data)):
        np.testing.assert_array_equal(load_audio(source), reference)


def test_raw_arrays_with_rates():
    same = tone(16000, 0.5)
    np.testing.assert_array_equal(load_audio(same, sample_rate=16000), same)
    stereo = torch.from_numpy(np.stack([tone(8000, 0.5), tone(8000, 0.5)]))
    for wave in (load_audio(stereo, sample_rate=8000), load_audio((stereo.numpy(), 8000))):
        assert abs(wave.size - 8000) <= 16 and correlation_with_tone(wave) > 0.99
    ints = (tone(48000, 0.5) * 32767).astype(np.int16)
    assert abs(np.abs(load_audio(ints, sample_rate=48000)[800:-800]).max() - 0.5) < 0.01


def test_raw_array_errors():
    with pytest.raises(MediaError):
        load_audio(np.zeros(100, np.float32))  # no rate
    with pytest.raises(MediaError, match="channels, samples"):
        load_audio(np.zeros((1000, 2), np.float32), sample_rate=16000)
    with pytest.raises(EmptyMediaError):
        load_audio(np.zeros(0, np.float32), sample_rate=16000)


def test_broken_files():
    with pytest.raises(MediaDecodeError):
        load_audio(b"this is not audio at all" * 100)
    flac = encode_audio("flac", "flac")
    with pytest.raises(MediaDecodeError):
        load_audio(flac[: len(flac) // 2])
    mp3 = encode_audio("mp3", "libmp3lame", seconds=3.0)
    with pytest.raises(MediaDecodeError, match="truncated"):
        load_audio(mp3[: len(mp3) // 2])
    with pytest.raises(EmptyMediaError):
        load_audio(encode_audio("flac", "flac", seconds=0.0))


def test_video_soundtrack():
    video_with_audio = encode_video()
    assert has_audio_stream(video_with_audio)
    assert not has_audio_stream(encode_video(seconds=0.5, with_audio=False))
    wave = load_audio(video_with_audio)
    assert abs(wave.size - 32000) <= 16 * 5 and correlation_with_tone(wave) > 0.95
