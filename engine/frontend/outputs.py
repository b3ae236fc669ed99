"""What users get back: RequestOutput with one CompletionOutput per sampled sequence (vLLM-shaped)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


# one dict per position: token id -> its Logprob (the chosen token plus the top-N)
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    audio: bytes = b""  # the spoken answer so far (SamplingParams.speech): PCM16 LE, mono, 24 kHz
    audio_finish_reason: str | None = None  # "stop" (the talker ended), "length" or "abort"; None while speaking

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # first entry None, as in vLLM
    num_cached_tokens: int = 0
