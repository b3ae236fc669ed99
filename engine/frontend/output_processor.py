"""Turns engine-core outputs into RequestOutputs: detokenizes, finds stop strings, joins n>1 samples."""

from __future__ import annotations

from dataclasses import dataclass, field

from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.frontend.detokenizer import IncrementalDetokenizer
from omnistream.engine.frontend.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestOutput,
)
from omnistream.scheduler.outputs import EngineCoreOutput, TokenLogprobs
from omnistream.scheduler.sampling_params import SamplingParams


@dataclass
class _Sample:
    """One sequence being generated (a request has n of them)."""

    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    speaks: bool = False  # audio was asked for: the sample ends when its audio ends too
    audio: bytearray = field(default_factory=bytearray)
    audio_finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        if self.finish_reason is None:
            return False
        return not self.speaks or self.audio_finish_reason is not None or self.finish_reason == "abort"


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    prompt_logprobs: list[PositionLogprobs | None] | None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=s.index,
                    text=s.detokenizer.output_text,
                    token_ids=list(s.token_ids),
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=s.logprobs,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    audio=bytes(s.audio),
                    audio_finish_reason=s.audio_finish_reason,
                )
                for s in self.samples
            ],
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=self.num_cached_tokens,
        )


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{index}_{request_id}"


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._parents: dict[str, _Parent] = {}
        self._children: dict[str, tuple[_Parent, _Sample]] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> list[str]:
        """Registers a request; returns the engine-core ids of its n samples."""
        samples = [
            _Sample(
                index=i,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                ),
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
                speaks=params.speech is not None,
            )
            for i in range(params.n)
        ]
        prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        parent = _Parent(request_id, prompt, prompt_token_ids, samples, prompt_logprobs)
        self._parents[request_id] = parent
        child_ids = [child_request_id(request_id, i, params.n) for i in range(params.n)]
        for child_id, sample in zip(child_ids, samples):
            self._children[child_id] = (parent, sample)
        return child_ids

    def _position(self, entry: TokenLogprobs) -> PositionLogprobs:
        return {
            tid: Logprob(logprob=lp, rank=rank, decoded_token=self.tokenizer.decode([tid], skip_special_tokens=False))
            for tid, lp, rank in zip(entry.token_ids, entry.logprobs, entry.ranks)
        }

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs that changed and the engine-core ids that hit a stop string."""
        changed: dict[str, _Parent] = {}
        stopped: list[str] = []
        for out in outputs:
            if out.req_id not in self._children:
                continue
            parent, sample = self._children[out.req_id]
            parent.num_cached_tokens = out.num_cached_tokens
            if parent.prompt_logprobs is not None:
                parent.prompt_logprobs.extend(self._position(e) for e in out.new_prompt_logprobs)
            sample.token_ids.extend(out.new_token_ids)
            for entry in out.new_logprobs:
                sample.logprobs.append(self._position(entry))
                sample.cumulative_logprob += entry.logprobs[0]
            sample.detokenizer.update(out.new_token_ids)
            sample.audio += out.new_audio
            if out.audio_finish_reason is not None:
                sample.audio_finish_reason = out.audio_finish_reason
            if sample.detokenizer.stop_string_matched is not None:
                sample.finish_reason, sample.stop_reason = "stop", sample.detokenizer.stop_string_matched
                if out.finish_reason is None:
                    stopped.append(out.req_id)
            elif out.finish_reason is not None:
                sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
                sample.detokenizer.flush()
            changed[parent.request_id] = parent
        results = []
        for request_id, parent in changed.items():
            results.append(parent.to_output())
            if parent.finished:
                self.forget(request_id)
        return results, stopped

    def forget(self, request_id: str) -> list[str]:
        """Drops a request; returns the engine-core ids of its samples (to abort them)."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        n = len(parent.samples)
        child_ids = [child_request_id(request_id, i, n) for i in range(n)]
        for child_id in child_ids:
            self._children.pop(child_id, None)
        return child_ids

    def has_unfinished(self) -> bool:
        return bool(self._parents)
