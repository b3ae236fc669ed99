"""Typed errors for media input: every failure to turn a user's audio, image or video into features.

All derive from `MediaError(ValueError)`, so front ends map the whole family to one client error.
"""

from __future__ import annotations


class MediaError(ValueError):
    """A media input could not be used; the message names the modality and the problem."""


class MediaDecodeError(MediaError):
    """The bytes are not a readable file: truncated, corrupt, or an unknown container/codec."""


class EmptyMediaError(MediaError):
    """The file decodes but holds nothing: zero audio samples, or a video without frames."""


class MediaTooSmallError(MediaError):
    """The content is too small to produce one feature (e.g. audio under one mel frame)."""


class MediaLimitError(MediaError):
    """A size, count or duration limit was exceeded."""

    def __init__(self, modality: str, limit: str, value: object, maximum: object) -> None:
        super().__init__(f"{modality}: {limit} is {value}, above the limit of {maximum}")
        self.modality, self.limit, self.value, self.maximum = modality, limit, value, maximum
