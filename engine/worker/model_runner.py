"""The model runner: holds the paged KV tensors, the persistent batch (slot tables) and per-request state, executes
one SchedulerOutput.

Per step it reads the SchedulerOutput once (one Python pass over the scheduled requests that collects their slot,
token count, token ids and sampling rows, and makes no tensors), builds the flat batch with vectorized numpy
(token positions, slot mapping, M-RoPE ids, offsets; media rows from their explicit ids), uploads it once, runs the
model (a decode-only step replays a captured graph on CUDA: cuda_graphs.py), and samples. The SchedulerOutput is
the only thing it is told.

`launch` enqueues a step and returns a StepFuture: the sampled ids are kept on the device as each slot's
`last_sampled` and copied back without waiting. A row whose last token the host has not been told (its step was
still in flight when the scheduler planned this one: overlapped scheduling) reads that token from `last_sampled`,
so the next step can be launched before this one's ids reach the host. `execute_model` is launch + result.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata, token_positions
from omnistream.engine.model_executor.distributed import tp_group_hidden
from omnistream.engine.worker.cuda_graphs import decode_graphs_for
from omnistream.engine.worker.greedy_head import (
    checked_greedy_tokens,
    greedy_pays,
    greedy_tokens,
    masked_greedy_serves,
    prepare_greedy_head,
)
from omnistream.engine.worker.kv_memory import zeroed_kv_cache
from omnistream.engine.worker.mm_encode import EncoderOutput, encode_feature
from omnistream.engine.worker.request_state import RunnerRequestState
from omnistream.engine.worker.sampler import SamplerOutput, SamplingMetadata, sample, to_host, top_logprobs
from omnistream.engine.worker.sampling_state import SamplingState
from omnistream.engine.worker.slot_tables import SlotTables
from omnistream.engine.worker.speech_runner import SpeechRunner
from omnistream.engine.worker.step_future import StepFuture, to_pinned_host
from omnistream.engine.worker.token_bitmask import PendingMasks, StepBitmask
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.speech_outputs import SpeechFrame
from omnistream.scheduler.outputs import (
    EMPTY_MODEL_RUNNER_OUTPUT,
    ModelRunnerOutput,
    SchedulerOutput,
    TokenLogprobs,
)

_PROMPT_LOGPROBS_ROWS = 256  # rows of full-vocab logits materialised at once for prompt logprobs


@dataclass
class FlatBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [3, T]
    metadata: AttentionMetadata
    req_ids: list[str]
    sample_rows: list[int]  # flat index of the last token of each request that samples
    sample_req_ids: list[str]
    sample_slots: list[int]  # the slot of each request that samples
    sample_num_pending: list[int]  # 1 where that request's last input token is read from last_sampled, else 0
    prompt_logprob_spans: list[tuple[str, int, int, int]]  # (req_id, first flat row, first position, count)
    media: list[tuple[int, int, int, MultiModalFeature]]  # (first flat row, first position, count, feature) per overlap


class DeviceSample(NamedTuple):
    """A step's sampled ids on the device, with what reading them back (and their logprobs) needs."""

    token_ids: torch.Tensor  # [R] int64, one per sampling row
    output: SamplerOutput | None  # None: greedy ids straight from the lm_head, no logprobs
    meta: SamplingMetadata


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_kv_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: list[int],
        max_num_seqs: int,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        # one page past the scheduler's pool: the sink, which padded tokens may write and no request owns
        self.sink_page = num_kv_blocks
        shape = model.kv_cache_shape_per_layer(num_kv_blocks + 1, block_size)
        self.kv_caches = [zeroed_kv_cache(shape, dtype, device) for _ in range(model.num_layers)]
        max_len = max_model_len or min(model.config.text.max_position_embeddings, num_kv_blocks * block_size)
        self.slots = SlotTables(max_num_seqs, -(-max_len // block_size), self.sink_page, device)
        self.requests: dict[str, RunnerRequestState] = {}
        self.slot_of: dict[str, int] = {}
        self.sampling = SamplingState(model.config.text.vocab_size, eos_token_ids, seed, device)
        self.encoder_cache: dict[str, EncoderOutput] = {}  # media identifier -> its embedding rows
        # decode-only steps replay captured graphs (CUDA, unless enforce_eager); None: every step runs eager
        self.decode_graphs = decode_graphs_for(
            model, self.kv_caches, max_num_seqs=max_num_seqs, max_pages=self.slots.block_table.shape[1],
            sink_page=self.sink_page, enforce_eager=enforce_eager,
        )
        prepare_greedy_head(model.lm_head)  # the greedy lm_head kernel is built now, not at the first greedy step
        self.speech: SpeechRunner | None = None  # the speech lane, set by the executor when it loads one

    def execute_model(
        self, scheduler_output: SchedulerOutput, grammar_bitmask: PendingMasks | None = None
    ) -> ModelRunnerOutput:
        return self.launch(scheduler_output, grammar_bitmask).result()

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput, grammar_bitmask: PendingMasks | None = None) -> StepFuture:
        """Enqueue one step; its output arrives through the future (at once on CPU). `grammar_bitmask`: the
        structured outputs' masks still being filled in this process (waited for only when sampling); without it
        they are read from the SchedulerOutput."""
        self._update_states(scheduler_output)
        speech = []
        if scheduler_output.speech is not None:
            with tp_group_hidden():  # the lane is whole on rank 0 (v1): its forwards join no TP collective
                speech = self.speech.execute(scheduler_output.speech)
        if scheduler_output.is_empty:
            if not speech:
                return StepFuture.done(EMPTY_MODEL_RUNNER_OUTPUT)
            return StepFuture.done(ModelRunnerOutput(sampled_req_ids=[], sampled_token_ids=[], logprobs=[], speech=speech))
        self._run_encoders(scheduler_output)
        batch = self._prepare_inputs(scheduler_output)
        embeds, deepstack = self._input_embeddings(batch)
        if self.decode_graphs is not None and self.decode_graphs.serves(batch.metadata, embeds):
            hidden = self.decode_graphs.run(batch.input_ids, batch.positions, batch.metadata)
        else:
            with self._speech_capture(batch, scheduler_output):
                hidden = self.model(
                    batch.input_ids, batch.positions, self.kv_caches, batch.metadata,
                    inputs_embeds=embeds, deepstack_embeds=deepstack,
                )
        prompt_logprobs = self._prompt_logprobs(hidden, batch)
        if not batch.sample_rows:
            return StepFuture.done(ModelRunnerOutput(sampled_req_ids=[], sampled_token_ids=[], logprobs=[],
                                                     prompt_logprobs=prompt_logprobs, speech=speech))
        sampled = self._sample(hidden, batch, scheduler_output, grammar_bitmask)
        self.slots.record_sampled(batch.sample_slots, sampled.token_ids)
        return self._read_back(batch.sample_req_ids, sampled, prompt_logprobs, speech)

    def _read_back(self, req_ids: list[str], sampled: DeviceSample,
                   prompt_logprobs: dict[str, list[TokenLogprobs]], speech: list[SpeechFrame]) -> StepFuture:
        """Enqueue the copies of the sampled ids (and logprobs) to the host; the future turns them into the output."""
        token_ids = to_pinned_host(sampled.token_ids)
        host = None
        if sampled.output is not None and sampled.output.logprobs is not None:
            host = SamplerOutput(token_ids, tuple(to_pinned_host(t) for t in sampled.output.logprobs))

        def finish() -> ModelRunnerOutput:
            if host is None:
                tokens, logprobs = token_ids.tolist(), [None] * len(req_ids)
            else:
                tokens, logprobs = to_host(host, sampled.meta)
            return ModelRunnerOutput(sampled_req_ids=req_ids, sampled_token_ids=tokens, logprobs=logprobs,
                                     prompt_logprobs=prompt_logprobs, speech=speech)

        return StepFuture.after_copies(self.device, finish)

    def _speech_capture(self, batch: FlatBatch, so: SchedulerOutput) -> AbstractContextManager[None]:
        """The speech lane keeps the thinker's hidden rows at its requests' user-turn media (prefill only)."""
        if self.speech is None or not self.speech.wants_thinker_rows:
            return nullcontext()
        counts = [so.num_scheduled_tokens[req_id] for req_id in batch.req_ids]
        ends = [int(self.slots.num_computed[self.slot_of[req_id]]) for req_id in batch.req_ids]
        return self.speech.capturing(self.model, batch.req_ids, ends, counts)

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids + so.preempted_req_ids:
            if self.requests.pop(req_id, None) is not None:
                self.slots.release(self.slot_of.pop(req_id))
            self.sampling.remove(req_id)
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = RunnerRequestState.from_new(new)
            self.sampling.set_request(new.req_id, new.sampling_params, new.token_ids, new.num_prompt_tokens)
            slot = self.slot_of[new.req_id] = self.slots.claim(new.num_computed_tokens)
            self.slots.add_pages(slot, new.block_ids)
        num_computed = self.slots.num_computed
        requests, slot_of = self.requests, self.slot_of
        for cached in so.scheduled_cached_reqs:  # most are decodes: one token, nothing else new
            req_id = cached.req_id
            state = requests[req_id]
            slot = slot_of[req_id]
            num_computed[slot] = cached.num_computed_tokens
            if cached.new_token_ids:
                state.token_ids.extend(cached.new_token_ids)
            if cached.new_block_ids:
                self.slots.add_pages(slot, cached.new_block_ids)
            if cached.new_mm_features:
                state.mm_features.extend(cached.new_mm_features)
            if cached.new_position_segments:
                state.add_segments(cached.new_position_segments)
            turn_moved = cached.num_prompt_tokens != state.num_prompt_tokens
            if turn_moved or cached.new_sampling_params is not None:
                state.num_prompt_tokens = cached.num_prompt_tokens
                if cached.new_sampling_params is not None:
                    state.sampling_params = cached.new_sampling_params
                self.sampling.set_request(req_id, state.sampling_params, state.token_ids, state.num_prompt_tokens)
        self.slots.apply_staged()

    def _run_encoders(self, so: SchedulerOutput) -> None:
        for identifier in so.freed_encoder_ids:
            self.encoder_cache.pop(identifier, None)
        for req_id, indices in so.scheduled_encoder_inputs.items():
            for index in indices:
                feature = self.requests[req_id].mm_features[index]
                self.encoder_cache[feature.identifier] = encode_feature(self.model, feature, self.device)

    def _input_embeddings(self, batch: FlatBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token embeddings with media rows copied into their placeholder positions, and the DeepStack
        rows for visual positions (None for a text-only batch: the model then embeds by itself)."""
        if not batch.media:
            return None, None
        embeds = self.model.embed_input_ids(batch.input_ids)
        deepstack = None
        for flat_start, start, count, feature in batch.media:
            output = self.encoder_cache[feature.identifier]
            lo, hi = max(start, feature.offset), min(start + count, feature.end)
            rows = slice(flat_start + lo - start, flat_start + hi - start)
            item_rows = slice(feature.row_offset + lo - feature.offset, feature.row_offset + hi - feature.offset)
            embeds[rows] = output.embeds[item_rows].to(embeds.dtype)
            if output.deepstack is not None:
                if deepstack is None:
                    deepstack = embeds.new_zeros(output.deepstack.shape[0], *embeds.shape)
                deepstack[:, rows] = output.deepstack[:, item_rows].to(embeds.dtype)
        return embeds, deepstack

    def _prepare_inputs(self, so: SchedulerOutput) -> FlatBatch:
        req_ids = [r.req_id for r in so.scheduled_new_reqs] + [r.req_id for r in so.scheduled_cached_reqs]
        slots = np.fromiter((self.slot_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        counts = np.fromiter((so.num_scheduled_tokens[r] for r in req_ids), dtype=np.int64, count=len(req_ids))
        starts = self.slots.num_computed[slots]
        ends = starts + counts
        query_start_loc, row, positions = token_positions(counts, ends)
        no_sample = set(so.no_sample_req_ids)
        token_ids: list[int] = []
        deltas: list[float] = []
        explicit: list[tuple[int, np.ndarray]] = []  # (first flat row, [3, n] ids) of rows that hold media
        sample_rows: list[int] = []
        sample_req_ids: list[str] = []
        sample_slots: list[int] = []
        sample_num_pending: list[int] = []
        pending_rows: list[int] = []  # flat rows whose token is the request's last_sampled (not known here yet)
        pending_slots: list[int] = []
        prompt_spans: list[tuple[str, int, int, int]] = []
        media: list[tuple[int, int, int, MultiModalFeature]] = []
        for req_id, slot, start, end, flat_start in zip(
            req_ids, slots.tolist(), starts.tolist(), ends.tolist(), query_start_loc.tolist()
        ):
            state = self.requests[req_id]
            token_ids += state.token_ids[start:end]
            num_known = len(state.token_ids)
            if end > num_known:  # the token it sampled in a step still in flight: at most one
                token_ids.append(0)
                pending_rows.append(flat_start + num_known - start)
                pending_slots.append(slot)
            ids = state.explicit_positions(start, end) if state.segment_starts else None
            if ids is None:
                deltas.append(state.text_delta(start) if state.segment_ends else 0.0)
            else:
                deltas.append(0.0)
                explicit.append((flat_start, ids))
            if state.num_done_features < len(state.mm_features):
                media.extend((flat_start, start, end - start, f) for f in state.live_features(start, end))
                state.take_done_features(end)
            if state.sampling_params.prompt_logprobs is not None:
                last_scored = min(end, state.num_prompt_tokens - 1)  # position p scores token p + 1
                if last_scored > start:
                    prompt_spans.append((req_id, flat_start, start, last_scored - start))
            if end >= num_known and req_id not in no_sample:
                sample_rows.append(flat_start + end - start - 1)
                sample_req_ids.append(req_id)
                sample_slots.append(slot)
                sample_num_pending.append(end - num_known)
        self.slots.num_computed[slots] = ends
        # M-RoPE ids: text rows continue at position + delta on all three axes; media rows take explicit ids
        mrope = np.empty((3, len(positions)), dtype=np.float32)
        mrope[:] = positions + np.asarray(deltas, dtype=np.float32)[row]
        for flat_start, ids in explicit:
            mrope[:, flat_start : flat_start + ids.shape[1]] = ids
        max_seq_len = int(ends.max())
        table = self.slots.rows(slots, -(-max_seq_len // self.block_size))
        block_size = self.block_size
        page_ids = self.slots.block_table[slots[row], positions // block_size].astype(np.int64)
        slot_mapping = page_ids * block_size + positions % block_size
        device = self.device
        metadata = AttentionMetadata(
            query_start_loc=torch.from_numpy(query_start_loc).to(device, non_blocking=True),
            seq_lens=torch.from_numpy(ends.astype(np.int32)).to(device, non_blocking=True),
            block_table=table,
            slot_mapping=torch.from_numpy(slot_mapping).to(device, non_blocking=True),
            num_tokens=len(positions),
            num_reqs=len(req_ids),
            max_query_len=int(counts.max()),
            max_seq_len=max_seq_len,
        )
        return FlatBatch(
            input_ids=self.slots.input_ids(np.array(token_ids, dtype=np.int64), pending_rows, pending_slots),
            positions=torch.from_numpy(mrope).to(device, non_blocking=True),
            metadata=metadata,
            req_ids=req_ids,
            sample_rows=sample_rows,
            sample_req_ids=sample_req_ids,
            sample_slots=sample_slots,
            sample_num_pending=sample_num_pending,
            prompt_logprob_spans=prompt_spans,
            media=media,
        )

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: FlatBatch) -> dict[str, list[TokenLogprobs]]:
        result: dict[str, list[TokenLogprobs]] = {}
        for req_id, flat_start, first_pos, count in batch.prompt_logprob_spans:
            state = self.requests[req_id]
            rows: list[TokenLogprobs] = []
            for off in range(0, count, _PROMPT_LOGPROBS_ROWS):
                n = min(_PROMPT_LOGPROBS_ROWS, count - off)
                logprobs = self.model.compute_logits(hidden[flat_start + off : flat_start + off + n]).log_softmax(-1)
                p0 = first_pos + off
                targets = torch.tensor(state.token_ids[p0 + 1 : p0 + 1 + n], dtype=torch.long, device=logprobs.device)
                rows.extend(top_logprobs(logprobs, targets, state.sampling_params.prompt_logprobs))
            result[req_id] = rows
        return result

    def _sample(
        self, hidden: torch.Tensor, batch: FlatBatch, so: SchedulerOutput, filling: PendingMasks | None
    ) -> DeviceSample:
        states = [self.requests[req_id] for req_id in batch.sample_req_ids]
        num_outputs = [len(state.token_ids) + pending - state.num_prompt_tokens
                       for state, pending in zip(states, batch.sample_num_pending)]
        meta = self.sampling.prepare(batch.sample_req_ids, num_outputs)
        hidden = hidden[batch.sample_rows]
        if meta.plain_greedy and greedy_pays(self.model.lm_head, meta.num_rows):
            return DeviceSample(self._greedy(hidden, batch.sample_req_ids, so, filling), None, meta)
        logits = self.model.compute_logits(hidden)
        grammar = StepBitmask.from_scheduler_output(so, batch.sample_req_ids, filling)  # (waits for the masks)
        if grammar is not None:
            grammar.apply(logits)
        out = sample(logits, meta)
        self.sampling.record(meta, out.token_ids)
        return DeviceSample(out.token_ids, out, meta)

    def _greedy(
        self, hidden: torch.Tensor, req_ids: list[str], so: SchedulerOutput, filling: PendingMasks | None
    ) -> torch.Tensor:
        """The greedy head's ids [B] for hidden [B, H]; a constrained row takes the first maximum of the tokens its
        grammar allows. Where the compiled head takes masks: with masks filled on demand, it keeps each row's best
        ids and the grammar checks them, and only the rows none of them settles get a mask (greedy_head.py); with
        masks filled beside the forward, or in the SchedulerOutput, it waits for them just before the head and
        masks inside it. Else the head runs unmasked, then the rows whose grammar rejects their token are corrected."""
        lm_head = self.model.lm_head
        checks = filling is not None and not filling.beside_forward and bool(so.grammar_req_ids)
        if checks and masked_greedy_serves(lm_head, hidden.dtype):
            return checked_greedy_tokens(lm_head, hidden, StepBitmask.rows_of(so, req_ids), filling)
        if masked_greedy_serves(lm_head, hidden.dtype) and (filling is None or filling.beside_forward):
            grammar = StepBitmask.from_scheduler_output(so, req_ids, filling)  # (waits for the masks)
            allowed = None if grammar is None else grammar.row_words(hidden.shape[0], lm_head.weight.shape[0])
            return greedy_tokens(lm_head, hidden, allowed)
        tokens = greedy_tokens(lm_head, hidden)
        grammar = StepBitmask.from_scheduler_output(so, req_ids, filling, tokens)  # (waits)
        if grammar is not None:
            tokens = grammar.correct_greedy(tokens, hidden, lm_head, self.model.compute_logits)
        return tokens
