"""Media generated on the fly with PyAV encoders (nothing is stored in git), and files with forged headers."""

from __future__ import annotations

import io
import struct
import wave
import zlib
from functools import lru_cache

import av
import numpy as np
import PIL.Image

TONE_HZ = 440.0


def tone(rate: int, seconds: float, hz: float = TONE_HZ) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _audio_frame(stereo: np.ndarray, rate: int, pts: int) -> av.AudioFrame:
    """Planar float stereo; PyAV converts it to the encoder's sample format and frame size."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo), format="fltp", layout="stereo")
    frame.sample_rate, frame.pts = rate, pts
    return frame


def _mux_audio(container: av.container.OutputContainer, stream: av.AudioStream, signal: np.ndarray) -> None:
    stereo, step = np.stack([signal, signal]), 1024
    for start in range(0, signal.size, step):
        frame = _audio_frame(stereo[:, start : start + step], stream.codec_context.sample_rate, start)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def encode_audio(container_format: str, codec: str, rate: int = 44100, seconds: float = 1.0) -> bytes:
    """A stereo sine file, encoded in memory."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        _mux_audio(container, stream, tone(rate, seconds))
    return buffer.getvalue()


@lru_cache(maxsize=4)
def encode_video(seconds: float = 2.0, fps: int = 10, size: int = 64, with_audio: bool = True) -> bytes:
    """An mp4 whose frame i is filled with gray level 10·i (frame identity readable from pixels), plus a tone."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        video.codec_context.qscale = 1
        audio = container.add_stream("aac", rate=44100, layout="stereo") if with_audio else None
        for i in range(int(seconds * fps)):
            pixels = np.full((size, size, 3), 10 * i, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if audio is not None:
            _mux_audio(container, audio, tone(44100, seconds))
    return buffer.getvalue()


def forged_png(width: int, height: int) -> bytes:
    """An 8×8 PNG whose header says width × height: it cannot be decoded at that size."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    at = png.index(b"IHDR")
    png[at + 4 : at + 12] = struct.pack(">II", width, height)
    png[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(png[at : at + 17])))
    return bytes(png)


def pcm16_wav(samples: int, rate: int) -> bytes:
    """A mono PCM16 WAV of `samples` samples whose header says `rate` Hz (so samples / rate seconds)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.ones(samples, "<i2").tobytes())
    return buffer.getvalue()
