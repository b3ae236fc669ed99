"""Audio input: decode any supported file (or a raw array) to float32 mono 16 kHz with PyAV.

Owns decoding, downmixing (mean of channels) and resampling; it never truncates or pads the signal. A clip
longer than its limit is refused before it is decoded (from the container's declared duration, or a raw
array's length) and, should the header lie, as soon as decoding passes the limit. Raw PCM rates are bounded.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Union

import av
import numpy as np
import torch

from .errors import EmptyMediaError, MediaDecodeError, MediaError, MediaLimitError

TARGET_RATE = 16000
MAX_AUDIO_SECONDS = 3600.0  # per clip, unless the caller gives its own limit
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000  # of raw PCM (arrays, live chunks): a rate of 1 Hz would
# turn a few bytes into hours of audio
_MAX_CHANNELS = 8  # a raw 2-D array is [channels, samples]; more rows than this means it is transposed
_BLOCK = 1 << 20  # raw arrays are resampled in blocks of this many samples
_PADDING_S = 0.1  # decoded audio past the declared duration, up to this much, is codec padding
_WAV_HEAD = 1 << 16  # bytes read to find a WAV's data chunk header

MediaFile = Union[str, Path, bytes, bytearray, memoryview, BinaryIO]
AudioSource = Union[MediaFile, np.ndarray, torch.Tensor, tuple]


def open_container(source: MediaFile, modality: str) -> av.container.InputContainer:
    """Open a path, encoded bytes or a file-like object with PyAV; failures become MediaDecodeError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, Path):
        source = str(source)
    elif hasattr(source, "seek") and hasattr(source, "read") and source.seekable():
        source.seek(0)
    try:
        return av.open(source, mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise MediaDecodeError(f"{modality}: cannot open the file ({exc})") from exc


def _wav_missing_bytes(source: MediaFile) -> int:
    """How many bytes of samples a RIFF/WAVE header declares beyond the end of the file (0 if none or not a WAV).

    FFmpeg estimates a WAV's duration from the file size, so a cut-off WAV would otherwise decode silently short.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = memoryview(source)
        head, size = bytes(data[:_WAV_HEAD]), len(data)
    elif isinstance(source, (str, Path)):
        if not Path(source).is_file():
            return 0  # missing files (and URLs) are reported by the decoder
        with open(source, "rb") as file:
            head, size = file.read(_WAV_HEAD), Path(source).stat().st_size
    elif hasattr(source, "seek") and source.seekable():
        source.seek(0)
        head, size = source.read(_WAV_HEAD), source.seek(0, io.SEEK_END)
        source.seek(0)
    else:
        return 0
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return 0
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"data":  # 0 and 0xFFFFFFFF: left unset by a streaming writer
            return 0 if length in (0, 0xFFFFFFFF) else max(0, pos + 8 + length - size)
        pos += 8 + length + (length & 1)
    return 0


def check_sample_rate(sample_rate: object, field: str = "sample_rate") -> int:
    """The rate of raw PCM samples if it is a whole number of Hz within the bounds; else MediaError."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or not (
        MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE
    ):
        raise MediaError(f"audio: {field} must be a whole number of Hz from {MIN_SAMPLE_RATE} to "
                         f"{MAX_SAMPLE_RATE}, got {sample_rate!r}")
    return int(sample_rate)


def _check_seconds(seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise MediaLimitError("audio", "duration in seconds", round(seconds, 2), max_seconds)


def has_audio_stream(source: MediaFile) -> bool:
    """Whether an encoded file (e.g. a video) holds at least one audio stream."""
    with open_container(source, "audio") as container:
        return bool(container.streams.audio)


class _Samples:
    """A growing float32 buffer, preallocated from the declared duration, so long files need no final concat."""

    def __init__(self, expected: int) -> None:
        self.data, self.size = np.empty(max(expected, _BLOCK), dtype=np.float32), 0

    def append(self, block: np.ndarray) -> None:
        if self.size + block.size > self.data.size:
            self.data = np.resize(self.data, max(2 * self.data.size, self.size + block.size))
        self.data[self.size : self.size + block.size] = block
        self.size += block.size

    def result(self, limit: int | None = None) -> np.ndarray:
        size = self.size if limit is None else min(self.size, limit)
        return self.data[:size] if size > self.data.size // 2 else self.data[:size].copy()


def _append_frames(frames: list[av.AudioFrame], out: _Samples) -> None:
    for frame in frames:
        out.append(frame.to_ndarray().mean(axis=0, dtype=np.float32))  # fltp: [channels, samples]


def _decode_file(source: MediaFile, max_seconds: float) -> np.ndarray:
    try:
        missing = _wav_missing_bytes(source)
    except OSError as exc:
        raise MediaDecodeError(f"audio: cannot open the file ({exc})") from exc
    if missing:
        raise MediaDecodeError(f"audio: truncated WAV file, {missing} bytes of samples its header declares are missing")
    with open_container(source, "audio") as container:
        if not container.streams.audio:
            raise EmptyMediaError("audio: the file has no audio stream")
        stream = container.streams.audio[0]
        declared = float(stream.duration * stream.time_base) if stream.duration else None
        _check_seconds(declared or (container.duration or 0) / av.time_base, max_seconds)  # before decoding
        resampler = av.AudioResampler(format="fltp", rate=TARGET_RATE)  # keeps the layout; we average channels
        out = _Samples(int((declared or 0) * TARGET_RATE * 1.05))
        try:
            for frame in container.decode(stream):
                _append_frames(resampler.resample(frame), out)
                _check_seconds(out.size / TARGET_RATE - _PADDING_S, max_seconds)  # a header that lied
            _append_frames(resampler.resample(None), out)
        except av.FFmpegError as exc:
            raise MediaDecodeError(f"audio: corrupt or truncated data ({exc})") from exc
    if out.size == 0:
        raise EmptyMediaError("audio: the file decodes to zero samples")
    if declared is None:
        return out.result()
    decoded_s = out.size / TARGET_RATE
    if decoded_s < declared - max(0.5, 0.05 * declared):
        raise MediaDecodeError(f"audio: truncated file, decoded {decoded_s:.2f} s of {declared:.2f} s declared")
    excess = out.size - round(declared * TARGET_RATE)
    return out.result(limit=round(declared * TARGET_RATE) if 0 < excess <= _PADDING_S * TARGET_RATE else None)


def _to_float(samples: np.ndarray) -> np.ndarray:
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    if np.issubdtype(samples.dtype, np.signedinteger):
        return (samples / float(np.iinfo(samples.dtype).max + 1)).astype(np.float32)
    raise MediaError(f"audio: unsupported sample dtype {samples.dtype}; use float or signed integers")


def _from_array(samples: np.ndarray | torch.Tensor, sample_rate: int | None, max_seconds: float) -> np.ndarray:
    """Raw samples: 1-D mono, or 2-D [channels, samples] (≤ 8 channels), at `sample_rate`."""
    if sample_rate is None:
        raise MediaError("audio: a raw array needs its sample_rate")
    sample_rate = check_sample_rate(sample_rate)
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples)
    _check_seconds(samples.shape[-1] / sample_rate if samples.ndim else 0, max_seconds)
    if samples.ndim == 2:
        if samples.shape[0] > _MAX_CHANNELS:
            raise MediaError(f"audio: 2-D arrays are [channels, samples]; got shape {samples.shape} (transpose it)")
        samples = _to_float(samples).mean(axis=0, dtype=np.float32)
    elif samples.ndim != 1:
        raise MediaError(f"audio: a raw array must be 1-D or 2-D, got shape {samples.shape}")
    samples = _to_float(samples)
    if samples.size == 0:
        raise EmptyMediaError("audio: the array has zero samples")
    if sample_rate == TARGET_RATE:
        return np.ascontiguousarray(samples)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=TARGET_RATE)
    out = _Samples(int(samples.size * TARGET_RATE / sample_rate) + 1)
    for start in range(0, samples.size, _BLOCK):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, start : start + _BLOCK]), "flt", "mono")
        frame.sample_rate, frame.pts = sample_rate, start
        _append_frames(resampler.resample(frame), out)
    _append_frames(resampler.resample(None), out)
    return out.result()


def load_audio(source: AudioSource, sample_rate: int | None = None,
               max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Float32 mono samples at 16 kHz from a path, encoded bytes, a file-like, or a raw array.

    A raw array (numpy or torch; 1-D mono or 2-D [channels, samples]) needs `sample_rate`, or comes as
    `(array, sample_rate)`. Encoded files may be any container PyAV reads, including a video's soundtrack.
    A clip longer than `max_seconds` is a MediaLimitError, raised before it is decoded whenever the file says
    its duration.
    """
    if isinstance(source, tuple):
        samples, sample_rate = source
        return _from_array(samples, sample_rate, max_seconds)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _from_array(source, sample_rate, max_seconds)
    return _decode_file(source, max_seconds)
