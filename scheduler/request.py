"""One request's state in the scheduler: its tokens, its progress and its status.

`num_computed_tokens` is the single progress counter; prefill and decode both mean "chase num_tokens".
"""

from __future__ import annotations

import bisect
import enum
import itertools

from omnistream.scheduler.block_hash import BlockHash, ExtraKeys, hash_block_tokens
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.tensor_data import PositionSegment
from omnistream.scheduler.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish-reason string: "stop", "length" or "abort"; None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


_generations = itertools.count()  # unique over every request, so a result never passes for another request's


class Request:
    """A token sequence that can grow (sampled outputs, appended input) and its progress.

    An open-input request (a live session) alternates between accepting input (appended tokens are
    prefilled, nothing is sampled) and generating (after commit_turn, until a stop), keeping its KV.
    The "prompt" is everything before the current turn's outputs, so stops, max_tokens and penalties
    apply per turn.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: list[int],
        arrival_time: float,
        priority: int = 0,
        *,
        extra_keys: ExtraKeys = (),
        mm_features: list[MultiModalFeature] | None = None,
        position_segments: list[PositionSegment] | None = None,
        open_input: bool = False,
    ) -> None:
        self.request_id = request_id
        self.sampling_params = sampling_params
        self.eos_token_ids = list(eos_token_ids)
        self.arrival_time = arrival_time
        self.priority = priority
        self.extra_keys = tuple(extra_keys)  # a request-wide salt mixed into every block hash
        self.mm_features = sorted(mm_features or [], key=lambda f: f.offset)
        self.position_segments = list(position_segments or [])  # opaque to the scheduler
        self.num_mm_features_sent = 0  # mm_features[:n] and position_segments[:m] are known to the runner
        self.num_position_segments_sent = 0
        self.sampling_params_sent = True  # False after a new turn's params, until the runner has them
        self.resend_to_runner = False  # input was rolled back: the runner gets the request again in full

        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.all_token_ids)  # where the current turn's outputs start
        self.open_input = open_input
        self.accepting_input = open_input  # open and between turns: input is prefilled, nothing sampled
        self.pending_since: float | None = None  # arrival time of the oldest appended input not yet scheduled
        self.num_computed_tokens = 0  # tokens whose KV is in the blocks (or scheduled to be this step)
        self.num_tokens_sent = 0  # all_token_ids[:num_tokens_sent] is what the model runner holds
        self.num_cached_tokens = 0  # prefix-cache hit at first schedule
        self.num_prompt_logprobs = 0  # prompt positions whose logprobs were reported (survives preemption)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.max_tokens: int | None = sampling_params.max_tokens  # resolved by resolve_max_tokens
        self.block_hashes: list[BlockHash] = []  # one per full block of all_token_ids
        self.grammar_pending = False  # its structured output's grammar is compiling: not scheduled until ready
        # Overlapped steps: tokens the runner samples in steps not settled yet (placeholders, counted as tokens to
        # compute), and the generation that in-flight results must carry to count (see invalidate_in_flight).
        self.num_placeholders = 0
        self.generation = next(_generations)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """The current turn's sampled tokens."""
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.all_token_ids[-1]

    @property
    def has_work(self) -> bool:
        """Tokens are waiting to be computed (a placeholder for a token still in flight counts)."""
        return self.num_computed_tokens < self.num_tokens + self.num_placeholders

    def invalidate_in_flight(self) -> None:
        """Results still in flight for this request no longer apply (abort, preemption, a turn that ended or was
        cancelled, rolled-back input): they are discarded on arrival. Between steps at most one placeholder is
        left, not yet scheduled, so no computed position goes past the known tokens."""
        self.generation = next(_generations)
        self.num_placeholders = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def resolve_max_tokens(self, max_model_len: int) -> int:
        """Cap max_tokens so prompt + outputs fit max_model_len (None means "up to max_model_len")."""
        room = max_model_len - self.num_prompt_tokens
        requested = self.sampling_params.max_tokens
        self.max_tokens = room if requested is None else min(requested, room)
        return self.max_tokens

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def append_input(
        self,
        token_ids: list[int],
        mm_features: list[MultiModalFeature],
        position_segments: list[PositionSegment],
        arrival_time: float,
    ) -> None:
        """Grow an accepting request with new input (e.g. a streamed audio window); it is prefilled as
        soon as the budget allows. Feature offsets and segment starts are absolute token indices."""
        self.all_token_ids.extend(token_ids)
        self.num_prompt_tokens = self.num_tokens
        self.mm_features.extend(sorted(mm_features, key=lambda f: f.offset))
        self.position_segments.extend(position_segments)
        if self.pending_since is None and token_ids:
            self.pending_since = arrival_time

    def rollback_input(self, num_tokens: int) -> list[MultiModalFeature]:
        """Drop everything after the first num_tokens tokens (input appended between turns, discarded before
        its commit), with the media and position segments inside it; returns the dropped media. The cut
        must not split a medium or a position segment."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"request {self.request_id!r}: cannot roll back to {num_tokens} of {self.num_tokens} tokens")
        for feature in self.mm_features:
            if feature.offset < num_tokens < feature.end:
                raise ValueError(f"request {self.request_id!r}: rolling back to {num_tokens} tokens would split "
                                 f"the medium at tokens {feature.offset}..{feature.end - 1}")
        for segment in self.position_segments:
            if segment.start < num_tokens < segment.start + segment.positions.shape[-1]:
                raise ValueError(f"request {self.request_id!r}: rolling back to {num_tokens} tokens would split "
                                 f"the position segment starting at token {segment.start}")
        dropped = [feature for feature in self.mm_features if feature.offset >= num_tokens]
        self.mm_features = [feature for feature in self.mm_features if feature.offset < num_tokens]
        self.position_segments = [segment for segment in self.position_segments if segment.start < num_tokens]
        del self.all_token_ids[num_tokens:]
        self.num_prompt_tokens = min(self.num_prompt_tokens, num_tokens)
        self.num_computed_tokens = min(self.num_computed_tokens, num_tokens)
        self.num_prompt_logprobs = min(self.num_prompt_logprobs, num_tokens)
        self.num_tokens_sent = min(self.num_tokens_sent, num_tokens)
        self.num_mm_features_sent = min(self.num_mm_features_sent, len(self.mm_features))
        self.num_position_segments_sent = min(self.num_position_segments_sent, len(self.position_segments))
        return dropped

    def start_turn(self, sampling_params: SamplingParams, max_model_len: int) -> None:
        """Input committed: the next sampled tokens are this turn's answer."""
        self.sampling_params = sampling_params
        self.sampling_params_sent = False
        self.accepting_input = False
        self.stop_reason = None
        self.resolve_max_tokens(max_model_len)

    def end_turn(self) -> None:
        """The answer stopped: back to accepting input, keeping every token and its KV."""
        self.accepting_input = True
        self.num_prompt_tokens = self.num_tokens
        self.invalidate_in_flight()

    def update_block_hashes(self, block_size: int) -> list[BlockHash]:
        """Extend block_hashes over the full blocks of all_token_ids that are not hashed yet."""
        for start in range(len(self.block_hashes) * block_size, self.num_tokens - block_size + 1, block_size):
            parent = self.block_hashes[-1] if self.block_hashes else None
            block = self.all_token_ids[start : start + block_size]
            self.block_hashes.append(hash_block_tokens(parent, block, self._block_extra_keys(start, block_size)))
        return self.block_hashes

    def _block_extra_keys(self, start: int, block_size: int) -> ExtraKeys:
        """The salt plus the identifiers of the media whose placeholders fall in this block."""
        media = []
        for index in range(self.first_media_ending_after(start), len(self.mm_features)):
            feature = self.mm_features[index]
            if feature.offset >= start + block_size:
                break
            media.append(feature.identifier)
        return self.extra_keys + tuple(media)

    def first_media_ending_after(self, position: int) -> int:
        """Index of the first media item with placeholders at or after `position` (items never overlap and
        are kept in offset order, so their ends are sorted too)."""
        return bisect.bisect_right(self.mm_features, position, key=lambda feature: feature.end)
