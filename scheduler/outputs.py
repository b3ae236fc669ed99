"""The contract between deciding and doing: SchedulerOutput in, ModelRunnerOutput back.

These msgspec Structs are the only things the model runner is told and the only things it
answers; they cross process boundaries (TP workers, engine core) as msgspec bytes.
"""

from __future__ import annotations

import msgspec

from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.speech_outputs import SpeechFrame, SpeechSchedule
from omnistream.scheduler.tensor_data import PositionSegment, TensorData


class NewRequestData(msgspec.Struct, kw_only=True):
    """A request the runner has not seen (or must rebuild after preemption)."""

    req_id: str
    token_ids: list[int]  # every token known now: the prompt, plus earlier outputs when resumed
    num_prompt_tokens: int  # token_ids[:num_prompt_tokens] is the prompt (penalties tell them apart)
    sampling_params: SamplingParams
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int  # tokens whose KV is already in the blocks (prefix-cache hits)
    mm_features: list[MultiModalFeature] = []  # media items, in order of their placeholders
    position_segments: list[PositionSegment] = []  # explicit M-RoPE ids of media-bearing input


class CachedRequestData(msgspec.Struct, kw_only=True):
    """A request the runner already holds; only what changed since the last step."""

    req_id: str
    new_token_ids: list[int]  # tokens appended since the runner last heard of it (outputs, new input)
    new_block_ids: list[int]  # appended to its block table
    num_computed_tokens: int
    new_mm_features: list[MultiModalFeature] = []  # media appended with new input (streaming)
    new_position_segments: list[PositionSegment] = []
    num_prompt_tokens: int = 0  # where the current turn's outputs start (moves at each turn of a session)
    new_sampling_params: SamplingParams | None = None  # a session's next turn decodes with these


class SchedulerOutput(msgspec.Struct, kw_only=True):
    """One step's plan. Tokens to compute per request are num_scheduled_tokens[req_id],
    starting at that request's num_computed_tokens. A request samples a token this step
    iff its computed tokens then reach the end of its known tokens, unless it is in no_sample_req_ids."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    preempted_req_ids: list[str]  # the runner drops their state; they come back as new
    finished_req_ids: list[str]  # finished or aborted since the last step; the runner drops them
    # media to encode before this step's forward: req_id -> indices into that request's mm_features
    scheduled_encoder_inputs: dict[str, list[int]] = {}
    freed_encoder_ids: list[str] = []  # encoder outputs the runner may drop (evicted from its cache)
    no_sample_req_ids: list[str] = []  # open sessions between turns: prefill their input, sample nothing
    # Structured outputs: the rows of requests that sample under a grammar this step, and their allowed
    # tokens as little-endian int32 words (bit t % 32 of word t // 32 set = token t allowed), row after row.
    grammar_req_ids: list[str] = []
    grammar_bitmask: bytes = b""
    speech: SpeechSchedule | None = None  # the speech lane's talker steps (scheduler/speech.py)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities at one position: entry 0 is the chosen token, then the top-N."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # 1-based rank of each token in the full distribution


class ModelRunnerOutput(msgspec.Struct, kw_only=True):
    """What one executed step produced."""

    sampled_req_ids: list[str]
    sampled_token_ids: list[int]  # parallel to sampled_req_ids
    logprobs: list[TokenLogprobs | None]  # parallel to sampled_req_ids; None when not asked for
    # Prompt logprobs computed this step, per request, for positions 1.. of the prompt in order
    # (the first prompt token has none); spread over several steps when the prefill is chunked.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
    speech: list[SpeechFrame] = []  # one per talker step run: the new frame's codes and PCM16 samples


EMPTY_MODEL_RUNNER_OUTPUT = ModelRunnerOutput(sampled_req_ids=[], sampled_token_ids=[], logprobs=[])


class EngineCoreOutput(msgspec.Struct, kw_only=True):
    """What one request produced in one step, as the engine core reports it to the front end."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = []
    new_prompt_logprobs: list[TokenLogprobs] = []
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id (or stop string) that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    session_open: bool = False  # finish_reason ended a turn of an open session, which goes on
    new_audio: bytes = b""  # spoken answer: PCM16 little-endian, mono, 24 kHz, appended in order
    audio_finish_reason: str | None = None  # "stop" (codec EOS), "length" or "abort" once the audio ended


class SchedulerStats(msgspec.Struct, kw_only=True):
    """A snapshot for metrics and logs."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks referenced by requests
    prefix_cache_queries: int  # tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int  # tokens found there, cumulative
    num_preemptions: int  # cumulative

    encoder_cache_hits: int = 0  # media whose encoder output was reused, cumulative
    num_encoded_media: int = 0  # media items sent to the encoders, cumulative
    num_live_prefill_tokens: int = 0  # open-session input prefilled before its turn was committed, cumulative
    num_aborted_requests: int = 0  # unfinished requests and sessions aborted from outside, cumulative
    num_speaking: int = 0  # requests holding a voice slot (their speech not yet ended)
    talker_kv_usage: float = 0.0  # fraction of the talker's KV blocks in use
    num_talker_preemptions: int = 0  # talker KV recomputed from stored frames, cumulative
