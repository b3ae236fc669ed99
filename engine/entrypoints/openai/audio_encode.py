"""Spoken answers in the format a client asked for: PCM16 24 kHz mono as raw PCM, WAV (standard library), or
FLAC/MP3/Opus/AAC through PyAV where this build has the encoder; any other format is refused before
generation (a 400)."""

from __future__ import annotations

import functools
import io
import wave

import av
import numpy as np

SAMPLE_RATE = 24000
_RAW = ("pcm16", "pcm")
# format -> (container, encoder names to try in order)
_PYAV = {
    "flac": ("flac", ("flac",)),
    "mp3": ("mp3", ("libmp3lame", "mp3")),
    "opus": ("ogg", ("libopus", "opus")),
    "aac": ("adts", ("aac",)),
}
MEDIA_TYPES = {
    "pcm16": "audio/pcm",
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except ValueError:  # PyAV's UnknownCodecError
        return False
    return True


@functools.cache
def _encoder(fmt: str) -> str | None:
    """The first PyAV encoder of `fmt` this build has, or None."""
    return next((name for name in _PYAV[fmt][1] if _has_encoder(name)), None)


def check_format(fmt: str) -> None:
    """ValueError (a 400) unless audio can be encoded as `fmt`."""
    if fmt in _RAW or fmt == "wav":
        return
    if fmt not in _PYAV:
        raise ValueError(
            f"audio format {fmt!r} is not supported; use one of {', '.join(sorted(MEDIA_TYPES))}"
        )
    if _encoder(fmt) is None:
        raise ValueError(f"audio format {fmt!r}: this server's PyAV build has no encoder for it")


def encode_audio(pcm: bytes, fmt: str) -> bytes:
    """PCM16 little-endian 24 kHz mono -> the bytes of a `fmt` file (raw PCM for pcm16/pcm)."""
    check_format(fmt)
    if fmt in _RAW:
        return pcm
    if fmt == "wav":
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes(pcm)
        return buffer.getvalue()
    return _encode_pyav(pcm, fmt)


def _encode_pyav(pcm: bytes, fmt: str) -> bytes:
    samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=_PYAV[fmt][0]) as container:
        stream = container.add_stream(_encoder(fmt), rate=SAMPLE_RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.rate = SAMPLE_RATE
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()
