"""The Scheduler: each step, who runs, how many tokens each computes, and which KV blocks they use.

One token budget per step: running requests first (decodes and unfinished chunked prefills, in
order), then waiting ones (FCFS). When blocks run out, the newest running request is preempted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import time

import msgspec

from omnistream.scheduler.block_pool import KVCacheBlock
from omnistream.scheduler.encoder_cache_manager import EncoderCacheManager
from omnistream.scheduler.kv_cache_manager import KVCacheManager
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
    SchedulerStats,
    TokenLogprobs,
)
from omnistream.scheduler.policy import make_policy, preemption_victim
from omnistream.scheduler.request import Request, RequestStatus
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.speech import SpeechLaneConfig, SpeechScheduler
from omnistream.scheduler.tensor_data import PositionSegment
from omnistream.scheduler.stop import check_stop


class SchedulerConfig(msgspec.Struct, kw_only=True):
    max_model_len: int
    num_kv_blocks: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # the token budget of one step
    block_size: int = 16
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0  # the largest prefill chunk per request and step; 0: off
    max_num_encoder_tokens: int = 0  # media embedding rows encoded per step; 0: max_num_batched_tokens
    encoder_cache_size: int = 0  # media embedding rows the runner keeps; 0: 4 x the encoder budget
    policy: str = "fcfs"  # fcfs, priority or deadline (see scheduler/policy.py)
    speech: SpeechLaneConfig | None = None  # the speech lane; None: audio output is refused

    def __post_init__(self) -> None:
        for name in ("max_model_len", "num_kv_blocks", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_num_encoder_tokens == 0:
            self.max_num_encoder_tokens = self.max_num_batched_tokens
        if self.encoder_cache_size == 0:
            self.encoder_cache_size = 4 * self.max_num_encoder_tokens
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache_manager = KVCacheManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.encoder_cache = EncoderCacheManager(config.encoder_cache_size)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admitted first; preemption takes from the back
        self.finished_req_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0
        self.num_live_prefill_tokens = 0  # open-session input prefilled before its turn was committed
        self.num_aborted_requests = 0  # unfinished requests (and sessions) aborted from outside
        self.policy = make_policy(config.policy)
        self.stream_lags: deque[float] = deque(maxlen=4096)  # seconds live input waited before scheduling
        # each SchedulerOutput not settled yet (by id) -> the generation of each request sampling in it
        self._sampling_generations: dict[int, dict[str, int]] = {}
        self.speech = SpeechScheduler(config.speech)

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError if it is malformed or could never finish even alone."""
        cfg = self.config
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens == 0 and not request.open_input:
            raise ValueError(f"request {request.request_id!r}: the prompt is empty")
        if not request.open_input:
            self._check_max_tokens(request.request_id, request.num_prompt_tokens, request.sampling_params)
        max_tokens = 1 if request.open_input else request.resolve_max_tokens(cfg.max_model_len)
        self._check_room(request.request_id, request.num_prompt_tokens, max_tokens)
        speech = request.sampling_params.speech
        if speech is not None:
            self.speech.check(request.request_id, request.prompt_token_ids, speech.voice,
                              request.mm_features, request.open_input)
            if speech.reply_token_ids:  # talker only: the thinker has nothing to do
                self.speech.add_reply(request.request_id, request.prompt_token_ids, speech.voice,
                                      request.sampling_params.seed, speech.do_sample, speech.reply_token_ids)
                return
        if request.open_input:  # a session's opening media are user input a spoken turn may read too
            self.speech.watch_session(request.request_id, request.mm_features)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def _check_max_tokens(self, request_id: str, num_prompt_tokens: int, params: SamplingParams) -> None:
        """ValueError if a max_tokens the caller set does not fit beside the prompt in max_model_len (as vLLM
        and OpenAI answer); None means "the rest of the context" and always fits."""
        limit = self.config.max_model_len
        if params.max_tokens is not None and num_prompt_tokens < limit < num_prompt_tokens + params.max_tokens:
            raise ValueError(
                f"max_tokens: request {request_id!r} has {num_prompt_tokens} prompt tokens and asks for "
                f"max_tokens {params.max_tokens}, {num_prompt_tokens + params.max_tokens} in all, but max_model_len "
                f"is {limit}; ask for at most {limit - num_prompt_tokens} (or leave max_tokens unset)"
            )

    def _check_room(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        """ValueError unless prompt + max_tokens fits max_model_len and, alone, the whole KV pool."""
        cfg = self.config
        if num_prompt_tokens >= cfg.max_model_len:
            raise ValueError(
                f"request {request_id!r}: the prompt has {num_prompt_tokens} tokens, "
                f"max_model_len is {cfg.max_model_len} (at least one output token must fit)"
            )
        # The last sampled token is never computed, so the KV holds at most prompt + max_tokens - 1.
        num_blocks = -(-(num_prompt_tokens + max_tokens - 1) // cfg.block_size)
        if num_blocks > cfg.num_kv_blocks:
            raise ValueError(
                f"request {request_id!r}: {num_prompt_tokens} prompt tokens + "
                f"max_tokens {max_tokens} need {num_blocks} KV blocks of {cfg.block_size} tokens, "
                f"but the pool has only {cfg.num_kv_blocks}"
            )

    def _open_request(self, request_id: str, accepting: bool) -> Request:
        request = self.requests.get(request_id)
        if request is None or not request.open_input:
            raise ValueError(f"no open session {request_id!r}")
        if request.accepting_input != accepting:
            state = "is generating an answer" if accepting else "has no turn in progress"
            raise ValueError(f"session {request_id!r} {state}")
        return request

    def append_input(
        self,
        request_id: str,
        token_ids: list[int],
        mm_features: list[MultiModalFeature] | None = None,
        position_segments: list[PositionSegment] | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Append input to an open session between turns; it is prefilled as soon as the budget allows."""
        request = self._open_request(request_id, accepting=True)
        self._check_room(request_id, request.num_tokens + len(token_ids), 1)
        request.append_input(
            token_ids, mm_features or [], position_segments or [],
            time.monotonic() if arrival_time is None else arrival_time,
        )
        self.speech.watch_session(request_id, mm_features or [])

    def commit_turn(
        self,
        request_id: str,
        token_ids: list[int],
        sampling_params: SamplingParams,
        position_segments: list[PositionSegment] | None = None,
    ) -> None:
        """End the user's input with `token_ids` (e.g. the assistant prompt) and generate an answer."""
        request = self._open_request(request_id, accepting=True)
        num_prompt_tokens = request.num_tokens + len(token_ids)
        self._check_max_tokens(request_id, num_prompt_tokens, sampling_params)
        room = self.config.max_model_len - num_prompt_tokens
        max_tokens = room if sampling_params.max_tokens is None else min(sampling_params.max_tokens, room)
        self._check_room(request_id, num_prompt_tokens, max(max_tokens, 1))
        self._speak_turn(request, token_ids, sampling_params)
        self.append_input(request_id, token_ids, None, position_segments)
        request.start_turn(sampling_params, self.config.max_model_len)

    def _speak_turn(self, request: Request, token_ids: list[int], sampling_params: SamplingParams) -> None:
        """A turn that asks for speech takes a voice for the session's whole conversation (every user turn is
        in its talker prompt); ValueError, and nothing changed, when it cannot speak."""
        speech = sampling_params.speech
        if speech is None:
            return
        request_id, prompt = request.request_id, request.all_token_ids + token_ids
        if speech.reply_token_ids:
            raise ValueError(f"session {request_id!r}: a turn cannot speak given text (reply_token_ids)")
        self.speech.check(request_id, prompt, speech.voice, request.mm_features, open_input=True)
        self.speech.end_turn(request_id)  # the previous turn's speech, if it still goes on
        if not self.speech.admit(request_id, prompt, speech.voice, sampling_params.seed, speech.do_sample,
                                 request.mm_features, session=True):
            raise ValueError(f"session {request_id!r}: every voice is speaking (max_num_voices "
                             f"{self.speech.config.max_num_voices}); try again when one ends")

    def cancel_turn(self, request_id: str) -> bool:
        """Stop the answer being generated, its text and its speech (the session stays open); False if none was."""
        request = self.requests.get(request_id)
        if request is None or not request.open_input:
            return False
        speaking = self.speech.end_turn(request_id)
        if request.accepting_input:
            return speaking
        request.end_turn()
        return True

    def rollback_input(self, request_id: str, num_tokens: int) -> None:
        """Drop an open session's input after its first num_tokens tokens (input the user discarded before
        committing it): the tokens, their media and position segments, and the KV blocks past the last full
        block that stays (the few tokens of a partial block are recomputed, so no cached block ever changes
        content). The runner gets the request again in full at its next step."""
        request = self._open_request(request_id, accepting=True)
        for feature in request.rollback_input(num_tokens):
            self.encoder_cache.release(request_id, feature.identifier)
        request.invalidate_in_flight()
        self.speech.roll_back(request_id, num_tokens)
        kept_blocks = num_tokens // self.config.block_size
        request.num_computed_tokens = min(request.num_computed_tokens, kept_blocks * self.config.block_size)
        del request.block_hashes[kept_blocks:]
        self.kv_cache_manager.truncate(request, kept_blocks)
        if request.num_tokens_sent:  # the runner holds its old tokens and media
            request.resend_to_runner = True

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (abort, stop string); unknown or finished ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}")
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for req_id in ids:
            self.speech.abort(req_id)
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            if status == RequestStatus.FINISHED_ABORTED:
                self.num_aborted_requests += 1
            self._release(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.speech.has_unfinished

    def get_num_unfinished_requests(self) -> int:
        """Requests with text or speech still to come (a spoken answer outlives its text)."""
        return len(self.requests.keys() | self.speech.requests.keys()) + len(self.speech.pending)

    def get_request(self, request_id: str) -> Request | None:
        """An unfinished request by id (finished ones are forgotten)."""
        return self.requests.get(request_id)

    def make_stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=kv.block_pool.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
            encoder_cache_hits=self.encoder_cache.num_hits,
            num_encoded_media=self.encoder_cache.num_encoded,
            num_live_prefill_tokens=self.num_live_prefill_tokens,
            num_aborted_requests=self.num_aborted_requests,
            num_speaking=len(self.speech.requests),
            talker_kv_usage=self.speech.kv_usage,
            num_talker_preemptions=self.speech.num_preemptions,
        )

    def lag_percentiles(self, percentiles: Iterable[float] = (50, 99)) -> dict[str, float | int | None]:
        """Percentiles (nearest rank) of `stream_lags`, the seconds live input waited before it was
        scheduled: {"p50": ..., "p99": ..., "max": ..., "count": n}; values are None with no samples."""
        lags = sorted(self.stream_lags)
        result: dict[str, float | int | None] = {"count": len(lags)}
        for q in percentiles:
            if not 0 <= q <= 100:
                raise ValueError(f"percentile must be in [0, 100], got {q}")
            rank = max(1, -(-len(lags) * q // 100)) if lags else 0
            result[f"p{q:g}"] = lags[int(rank) - 1] if lags else None
        result["max"] = lags[-1] if lags else None
        return result

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        encoder_budget = self.config.max_num_encoder_tokens
        kv_cache_manager = self.kv_cache_manager
        max_chunk = self.config.long_prefill_token_threshold or budget  # per request and step
        num_scheduled: dict[str, int] = {}
        scheduled: list[tuple[Request, int]] = []  # in the order of num_scheduled
        cached_data: list[CachedRequestData] = []
        resent: list[Request] = []  # rolled back: the runner drops them and gets them again whole, KV kept
        encoder_inputs: dict[str, list[int]] = {}
        new_reqs: list[Request] = []
        preempted: list[Request] = []

        # Running requests first, in policy order; make room by preempting (idle sessions, then the newest).
        # What the runner is told of each is read at once: nothing later in this step changes a scheduled
        # running request (preemption only takes requests not scheduled yet).
        for request in self.policy.running_order(self.running):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING or request.grammar_pending:
                continue  # preempted earlier in this step, or waiting for its grammar
            pending = request.num_placeholders
            if pending and self._ends_in_flight(request):
                continue  # its last token is in flight: nothing follows it
            num_tokens = min(len(request.all_token_ids) + pending - request.num_computed_tokens, budget, max_chunk)
            media = None
            if request.mm_features:
                num_tokens, media = self._plan_encoder_inputs(
                    request, request.num_computed_tokens, num_tokens, encoder_budget
                )
            if num_tokens > 0:
                blocks = kv_cache_manager.allocate_slots(request, num_tokens)
                if blocks is None:
                    blocks = self._allocate_or_preempt(request, num_tokens, preempted, num_scheduled)
                    if blocks is None:
                        continue  # it was chosen as the victim itself
                num_scheduled[request.request_id] = num_tokens
                scheduled.append((request, num_tokens))
                if request.resend_to_runner:
                    resent.append(request)
                else:
                    block_ids = [block.block_id for block in blocks] if blocks else []  # most decodes: none
                    cached_data.append(self._cached_data(request, block_ids))
                budget -= num_tokens
                if media:
                    encoder_budget -= self._commit_encoder_inputs(request, media, encoder_inputs)

        # Then waiting requests in policy order, unless this step is short of blocks. Open sessions
        # with no input yet wait without holding anyone up.
        for request in [] if preempted else self.policy.waiting_order(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not request.has_work or request.grammar_pending or not self._take_voice(request):
                continue
            hits, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            if self.speech.needs_thinker_rows(request.request_id):
                hits, num_hit_tokens = [], 0  # the talker needs hidden rows a cache hit would skip
            num_tokens = self._num_tokens_to_schedule(request, num_hit_tokens, budget)
            num_tokens, media = self._plan_encoder_inputs(request, num_hit_tokens, num_tokens, encoder_budget)
            if num_tokens == 0 or self.kv_cache_manager.allocate_slots(request, num_tokens, hits) is None:
                break
            self.waiting.remove(request)
            if request.status == RequestStatus.WAITING:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            new_reqs.append(request)
            num_scheduled[request.request_id] = num_tokens
            scheduled.append((request, num_tokens))
            budget -= num_tokens
            encoder_budget -= self._commit_encoder_inputs(request, media, encoder_inputs)

        output = self._make_output(num_scheduled, scheduled, new_reqs, resent, cached_data, preempted, encoder_inputs)
        output.speech = self.speech.schedule()
        sampling: dict[str, int] = {}
        now = time.monotonic()
        for request, num_tokens in scheduled:
            if request.pending_since is not None:
                self.stream_lags.append(now - request.pending_since)
                request.pending_since = None
            if request.accepting_input:
                self.num_live_prefill_tokens += num_tokens
            request.num_computed_tokens += num_tokens
            request.num_tokens_sent = len(request.all_token_ids)
            request.num_mm_features_sent = len(request.mm_features)
            request.num_position_segments_sent = len(request.position_segments)
            request.sampling_params_sent = True
            request.resend_to_runner = False
            computed = request.num_computed_tokens
            if request.mm_features:
                self._release_encoder_outputs(request, computed, computed - num_tokens)
            if computed == len(request.all_token_ids) + request.num_placeholders and not request.accepting_input:
                request.num_placeholders += 1  # the token this step samples, unknown until the step is settled
                sampling[request.request_id] = request.generation
        self._sampling_generations[id(output)] = sampling
        self.finished_req_ids = set()
        return output

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput,
        grammar_complete: Iterable[str] = (),
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, check stops, free finished requests; one output per request that
        got a token or prompt logprobs this step. Requests in `grammar_complete` end with their token
        (their structured output is complete)."""
        complete = set(grammar_complete)
        out = model_runner_output
        generations = self._sampling_generations.pop(id(scheduler_output), {})
        sampled = {req_id: i for i, req_id in enumerate(out.sampled_req_ids)}
        requests = self.requests
        speaking = bool(self.speech.requests)  # the speech lane hears the replies of the requests it voices
        outputs = []
        any_finished = False
        for req_id in scheduler_output.num_scheduled_tokens:
            request = requests.get(req_id)
            if request is None:
                continue  # finished meanwhile (aborted)
            generation = generations.get(req_id)
            if generation is not None:
                if generation != request.generation:
                    continue  # stale: in flight when the request was aborted, preempted or its turn ended
                request.num_placeholders -= 1
            prompt_logprobs = self._new_prompt_logprobs(request, scheduler_output, out) if out.prompt_logprobs else []
            index = sampled.get(req_id)
            if index is None and not prompt_logprobs:
                continue  # a prefill chunk with nothing to report
            engine_output = EngineCoreOutput(
                req_id=req_id,
                new_token_ids=[],
                new_prompt_logprobs=prompt_logprobs,
                num_cached_tokens=request.num_cached_tokens,
            )
            if index is not None:
                self._append_sampled(request, out, index, engine_output, req_id in complete)
                any_finished = any_finished or engine_output.finish_reason is not None
            outputs.append(engine_output)
            if speaking:
                self.speech.on_reply(req_id, engine_output.new_token_ids, engine_output.finish_reason)
        if any_finished:
            self.running = [request for request in self.running if not request.is_finished]
        return self._add_audio(outputs, scheduler_output, model_runner_output)

    def _take_voice(self, request: Request) -> bool:
        """A request that speaks enters the thinker only with a voice slot."""
        speech = request.sampling_params.speech
        if speech is None or request.open_input:
            return True  # a session's turn takes its voice when it is committed
        if request.num_output_tokens and request.request_id not in self.speech.requests:
            return True  # its speech has ended (its text goes on): a resumed request never speaks twice
        return self.speech.admit(request.request_id, request.prompt_token_ids, speech.voice,
                                 request.sampling_params.seed, speech.do_sample, request.mm_features)

    def _add_audio(
        self, outputs: list[EngineCoreOutput], scheduler_output: SchedulerOutput, out: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Attach this step's audio to the requests' outputs (a request whose text ended gets its own)."""
        audio = self.speech.update(scheduler_output.speech, out.speech)
        if not audio:
            return outputs
        by_id = {engine_output.req_id: engine_output for engine_output in outputs}
        for req_id, update in audio.items():
            engine_output = by_id.get(req_id)
            if engine_output is None:
                engine_output = EngineCoreOutput(req_id=req_id, new_token_ids=[])
                outputs.append(engine_output)
            engine_output.new_audio, engine_output.audio_finish_reason = update.pcm, update.finish
            if update.reply_only and update.finish is not None:
                engine_output.finish_reason = "stop"  # a talker-only request ends with its speech
        return outputs

    # ---- helpers -------------------------------------------------------------------------

    def _num_tokens_to_schedule(self, request: Request, num_computed_tokens: int, budget: int) -> int:
        if request.num_placeholders and self._ends_in_flight(request):
            return 0  # its last token is in flight: nothing follows it
        num_tokens = min(request.num_tokens + request.num_placeholders - num_computed_tokens, budget)
        if self.config.long_prefill_token_threshold > 0:
            num_tokens = min(num_tokens, self.config.long_prefill_token_threshold)
        return num_tokens

    def _ends_in_flight(self, request: Request) -> bool:
        """Whether the tokens in flight take the request to its max_tokens or to max_model_len."""
        num_tokens = request.num_tokens + request.num_placeholders
        reached_max = request.max_tokens is not None and num_tokens - request.num_prompt_tokens >= request.max_tokens
        return reached_max or num_tokens >= self.config.max_model_len

    def _plan_encoder_inputs(
        self, request: Request, start: int, num_tokens: int, encoder_budget: int
    ) -> tuple[int, list[int]]:
        """Which of the request's media must be encoded for tokens [start, start+num_tokens), within
        the encoder budget and cache room; the span is cut short before media that do not fit.
        Returns the (possibly smaller) token count and the media indices to encode."""
        end = start + num_tokens
        planned: list[int] = []
        planned_rows = 0
        for index in range(request.first_media_ending_after(start), len(request.mm_features)):
            feature = request.mm_features[index]
            if feature.offset >= end:
                break
            if self.encoder_cache.lookup(request.request_id, feature.identifier):
                continue
            fresh_budget = encoder_budget == self.config.max_num_encoder_tokens and not planned
            fits_budget = feature.length <= encoder_budget - planned_rows or fresh_budget
            if not fits_budget or not self.encoder_cache.can_allocate(feature.length, planned_rows):
                return max(0, feature.offset - start), planned
            planned.append(index)
            planned_rows += feature.length
        return num_tokens, planned

    def _commit_encoder_inputs(self, request: Request, media: list[int], encoder_inputs: dict[str, list[int]]) -> int:
        """Reserve encoder-cache room for planned media; returns the encoder rows used."""
        rows = 0
        for index in media:
            feature = request.mm_features[index]
            if self.encoder_cache.lookup(request.request_id, feature.identifier):
                continue  # the same media was planned by an earlier request this step
            self.encoder_cache.allocate(request.request_id, feature.identifier, feature.length)
            encoder_inputs.setdefault(request.request_id, []).append(index)
            rows += feature.length
        return rows

    def _release_encoder_outputs(self, request: Request, computed_up_to: int, computed_before: int = 0) -> None:
        """Media whose every row is computed (up to computed_up_to) are no longer needed by this request;
        those already wholly computed at computed_before were released then."""
        for index in range(request.first_media_ending_after(computed_before), len(request.mm_features)):
            feature = request.mm_features[index]
            if feature.end > computed_up_to:
                break
            self.encoder_cache.release(request.request_id, feature.identifier)

    def _allocate_or_preempt(
        self, request: Request, num_tokens: int, preempted: list[Request], scheduled: dict[str, int]
    ) -> list[KVCacheBlock] | None:
        """Allocate for a running request, preempting others not scheduled yet this step (idle sessions
        first, then the newest) until it fits. None when the request had to preempt itself."""
        while True:
            blocks = self.kv_cache_manager.allocate_slots(request, num_tokens)
            if blocks is not None:
                return blocks
            victim = preemption_victim([r for r in self.running if r.request_id not in scheduled])
            self.running.remove(victim)
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop its KV; it goes to the front of the waiting queue."""
        self.kv_cache_manager.free(request)
        self._release_encoder_outputs(request, request.num_tokens)
        request.invalidate_in_flight()
        request.num_computed_tokens = 0
        request.num_tokens_sent = request.num_mm_features_sent = request.num_position_segments_sent = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _make_output(
        self,
        num_scheduled: dict[str, int],
        scheduled: list[tuple[Request, int]],
        new_reqs: list[Request],
        resent: list[Request],
        cached_data: list[CachedRequestData],
        preempted: list[Request],
        encoder_inputs: dict[str, list[int]],
    ) -> SchedulerOutput:
        new_data = [
            NewRequestData(
                req_id=request.request_id,
                token_ids=list(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens,
                sampling_params=request.sampling_params,
                block_ids=self.kv_cache_manager.get_block_ids(request),
                num_computed_tokens=request.num_computed_tokens,
                mm_features=request.mm_features,
                position_segments=request.position_segments,
            )
            for request in new_reqs + resent
        ]
        return SchedulerOutput(
            scheduled_new_reqs=new_data,
            scheduled_cached_reqs=cached_data,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            preempted_req_ids=[request.request_id for request in preempted + resent],
            finished_req_ids=sorted(self.finished_req_ids),
            scheduled_encoder_inputs=encoder_inputs,
            freed_encoder_ids=self.encoder_cache.take_freed(),
            no_sample_req_ids=[request.request_id for request, _ in scheduled if request.accepting_input],
        )

    @staticmethod
    def _cached_data(request: Request, new_block_ids: list[int]) -> CachedRequestData:
        """What the runner has not heard about this request yet: tokens, blocks, media, positions."""
        return CachedRequestData(
            req_id=request.request_id,
            new_token_ids=request.all_token_ids[request.num_tokens_sent :],
            new_block_ids=new_block_ids,
            num_computed_tokens=request.num_computed_tokens,
            new_mm_features=request.mm_features[request.num_mm_features_sent :],
            new_position_segments=request.position_segments[request.num_position_segments_sent :],
            num_prompt_tokens=request.num_prompt_tokens,
            new_sampling_params=None if request.sampling_params_sent else request.sampling_params,
        )

    def _new_prompt_logprobs(
        self, request: Request, scheduler_output: SchedulerOutput, out: ModelRunnerOutput
    ) -> list[TokenLogprobs]:
        """This step's prompt logprobs, less those already reported before a preemption recomputed them."""
        entries = out.prompt_logprobs.get(request.request_id, [])
        first_position = request.num_computed_tokens - scheduler_output.num_scheduled_tokens[request.request_id] + 1
        entries = entries[max(0, request.num_prompt_logprobs - first_position + 1) :]
        request.num_prompt_logprobs += len(entries)
        return entries

    def _append_sampled(
        self, request: Request, out: ModelRunnerOutput, index: int, engine_output: EngineCoreOutput,
        grammar_complete: bool = False,
    ) -> None:
        if request.num_computed_tokens < len(request.all_token_ids) or request.accepting_input:
            raise ValueError(
                f"request {request.request_id!r} sampled a token with {request.num_computed_tokens} of "
                f"{request.num_tokens} tokens computed: the runner broke the SchedulerOutput contract"
            )
        token = out.sampled_token_ids[index]
        request.append_output_token(token)
        engine_output.new_token_ids.append(token)
        if out.logprobs[index] is not None:
            engine_output.new_logprobs.append(out.logprobs[index])
        if check_stop(request, self.config.max_model_len, grammar_complete):
            engine_output.finish_reason = request.status.finish_reason
            engine_output.stop_reason = request.stop_reason
            if request.open_input and request.num_tokens < self.config.max_model_len:
                request.status = RequestStatus.RUNNING  # the turn ended; the session goes on
                request.end_turn()
                engine_output.session_open = True
            else:
                self._release(request)

    def _release(self, request: Request) -> None:
        """Forget a finished request: free its blocks (cached ones stay hittable) and report it."""
        request.invalidate_in_flight()
        if request.open_input:  # a session that outgrew max_model_len: its speech and kept rows go with it
            self.speech.abort(request.request_id)
        self.kv_cache_manager.free(request)
        self._release_encoder_outputs(request, request.num_tokens)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)
