"""SamplingParams: how one request is decoded and when it stops (validated, msgspec-serialisable), and the one
rule for token ids a request carries (inside the model's vocabulary).

Every integer is bounded to int64 (a seed is any int, taken modulo 2**64) and every float must be finite, so that
nothing a client sends can overflow the engine core's messages or poison the sampler; the request schemas of the
front ends declare these bounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from omnistream.scheduler.structured_outputs import StructuredOutputsParams

_GREEDY_EPS = 1e-5
AUDIO_FORMATS = ("pcm16", "wav", "pcm", "flac", "mp3", "opus", "aac")  # what a client may ask audio out in
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the range of every integer field (seed included)
MAX_LOGPROBS = 20  # alternatives per token, for generated tokens and prompt tokens alike
_INT_FIELDS = ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")


def check_token_ids(token_ids: Iterable[int], vocab_size: int, field: str) -> None:
    """ValueError naming `field` unless every id is in a vocabulary of `vocab_size` ids (0..vocab_size-1)."""
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{field}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except (OverflowError, TypeError):  # an int past float's range, or not a number at all
        return False


def _wrap_int64(value: int) -> int:
    """The int64 congruent to `value` modulo 2**64 (two's complement), as the sampler takes a seed."""
    return (value - INT64_MIN) % 2**64 + INT64_MIN


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of a request's `index`-th independent answer: one more per answer, wrapping within int64."""
    return None if seed is None else _wrap_int64(seed + index)


class SpeechParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Speak the answer: the voice (a checkpoint speaker, checked by the scheduler) and how the front end
    encodes it. do_sample False makes the talker and code predictor greedy (HF's talker_do_sample)."""

    voice: str = "ethan"
    format: str = "pcm16"
    do_sample: bool = True
    # talker only (/v1/audio/speech): speak these thinker tokens as the answer; the thinker generates nothing
    reply_token_ids: list[int] = []

    def __post_init__(self) -> None:
        self.voice = self.voice.lower()
        if self.format not in AUDIO_FORMATS:
            raise ValueError(f"audio format must be one of {', '.join(AUDIO_FORMATS)}; got {self.format!r}")


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """vLLM-shaped sampling parameters. Construct, then call nothing: validation runs in __post_init__."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (JSON, regex, ...)
    speech: SpeechParams | None = None  # also speak the answer (the checkpoint needs a talker)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.seed, int):  # any int is a seed, taken modulo 2**64: carried as an int64
            self.seed = _wrap_int64(self.seed)
        self._check_types()
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0 or self.top_k == -1, f"top_k must be 0/-1 (off) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be positive, got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be from 0 to {MAX_LOGPROBS}, got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be from 0 to {MAX_LOGPROBS}, got {self.prompt_logprobs}",
            ),
            (all(s for s in self.stop), "stop strings must be non-empty"),
            (
                self.speech is None or not self.stop,
                "stop strings cannot be combined with audio output (the talker may have spoken past them)",
            ),
            (self.speech is None or self.n == 1, f"audio output needs n=1, got n={self.n}"),
            (
                all(t >= 0 for t in self.stop_token_ids),
                f"stop_token_ids: token ids are non-negative, got {min(self.stop_token_ids, default=0)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.top_k == -1:
            self.top_k = 0

    def _check_types(self) -> None:
        """Integers within int64, floats finite: a value past them is refused before any range check."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None and not INT64_MIN <= value <= INT64_MAX:
                raise ValueError(f"{name} must be a 64-bit integer ({INT64_MIN} to {INT64_MAX}), got {value}")
        for name in _FLOAT_FIELDS:
            if not _finite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        bad = next((t for t in self.stop_token_ids if not INT64_MIN <= t <= INT64_MAX), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids: token ids are 64-bit integers, got {bad}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError naming the field when a token id of these params is not in a vocabulary of
        `vocab_size` ids (the model's: only the front end that built the request knows it)."""
        check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids")
        if self.speech is not None:
            check_token_ids(self.speech.reply_token_ids, vocab_size, "speech.reply_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS
