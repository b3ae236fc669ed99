"""Per-request sampling parameters in slot tables, and each step's SamplingMetadata built from them.

A request takes a slot when the runner first sees it; its values are written into host tables then, and again
when its parameters or its turn boundary change (a session's next turn). Each step gathers the sampling rows'
values with one numpy index per table, derives the row sets (greedy, random, filtered, penalized, blocked,
asking for logprobs) from them, and uploads all of it in one buffer per dtype: no tensor per request.

Draw keys (sampling_draws.py): a seeded request draws from (its seed, its output position), so its tokens do not
depend on the batch or on preemption; the other rows take consecutive numbers of the engine seed's stream.
Penalty counts live in penalty_counts.PenaltyCounts and are counted on the device after each sampling (record).
"""

from __future__ import annotations

import numpy as np
import torch

from omnistream.engine.worker.penalty_counts import PenaltyCounts
from omnistream.engine.worker.sampler import (
    Blocked,
    Filters,
    LogprobRows,
    Penalties,
    RandomRows,
    SamplingMetadata,
)
from omnistream.engine.worker.sampling_draws import ENGINE_STREAM, SEEDED_STREAM, row_keys
from omnistream.scheduler.sampling_params import SamplingParams

# columns of the float32 and int64 slot tables
_TEMPERATURE, _TOP_P, _MIN_P, _PRESENCE, _FREQUENCY, _REPETITION = range(6)
_TOP_K, _SEED, _STREAM, _MIN_TOKENS, _LOGPROBS, _PENALTY_ROW = range(6)


def _int64(value: int) -> int:
    """Any Python int as the int64 with the same low 64 bits."""
    return (value + 2**63) % 2**64 - 2**63


class SamplingState:
    """The runner's sampling side: requests' parameters by slot, the engine's draw counter, penalty tables."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.engine_seed = _int64(seed)
        self.device = device
        self.penalties = PenaltyCounts(vocab_size, device)
        self._slots: dict[str, int] = {}
        self._free: list[int] = []
        self._floats = np.zeros((0, 6), np.float32)
        self._ints = np.zeros((0, 6), np.int64)
        self._blocked = np.full((0, 1), -1, np.int64)  # eos / stop ids of each slot, -1 past its last
        self._num_draws = 0  # numbers of the engine stream used so far

    def set_request(self, req_id: str, params: SamplingParams, token_ids: list[int],
                    num_prompt_tokens: int) -> None:
        """Write a request's parameters (a new request, or new params / a moved turn boundary for a known one);
        its penalty counts are rebuilt from token_ids, of which the first num_prompt_tokens are the prompt."""
        slot = self._slots.get(req_id)
        if slot is None:
            slot = self._slots[req_id] = self._claim_slot()
        top_k = params.top_k if 0 < params.top_k < self.vocab_size else 0
        temperature = 0.0 if params.greedy else params.temperature  # greedy is decided once, in float64
        self._floats[slot] = (temperature, params.top_p, params.min_p, params.presence_penalty,
                              params.frequency_penalty, params.repetition_penalty)
        stream = SEEDED_STREAM if params.seed is not None else ENGINE_STREAM
        logprobs = -1 if params.logprobs is None else params.logprobs
        row = int(self._ints[slot, _PENALTY_ROW])
        penalized = (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) != (0, 0, 1)
        prompt, outputs = token_ids[:num_prompt_tokens], token_ids[num_prompt_tokens:]
        if penalized and row >= 0:
            self.penalties.refill(row, prompt, outputs)
        elif penalized:
            row = self.penalties.claim(prompt, outputs)
        elif row >= 0:
            self.penalties.release(row)
            row = -1
        seed = _int64(params.seed if params.seed is not None else 0)
        self._ints[slot] = (top_k, seed, stream, params.min_tokens, logprobs, row)
        self._set_blocked(slot, list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids))

    def remove(self, req_id: str) -> None:
        """Forget a request (finished, aborted or preempted); unknown ids are ignored."""
        slot = self._slots.pop(req_id, None)
        if slot is None:
            return
        row = int(self._ints[slot, _PENALTY_ROW])
        if row >= 0:
            self.penalties.release(row)
        self._ints[slot, _PENALTY_ROW] = -1
        self._free.append(slot)

    def prepare(self, req_ids: list[str], num_outputs: list[int]) -> SamplingMetadata:
        """The metadata of a step whose rows sample for req_ids (with num_outputs output tokens so far)."""
        slots = np.fromiter(map(self._slots.__getitem__, req_ids), np.int64, len(req_ids))
        floats, ints = self._floats[slots], self._ints[slots]
        outputs = np.asarray(num_outputs, np.int64)
        greedy = floats[:, _TEMPERATURE] == 0.0
        penalized = ints[:, _PENALTY_ROW] >= 0
        blocked = (outputs < ints[:, _MIN_TOKENS]) & (self._blocked[slots, 0] >= 0)
        asking = ints[:, _LOGPROBS] >= 0
        arrays: dict[str, np.ndarray] = {}
        _add_rows(arrays, "greedy_rows", greedy)
        widths: list[int] = []
        if not greedy.all():
            widths = self._random_arrays(arrays, floats[~greedy], ints[~greedy], outputs[~greedy])
            _add_rows(arrays, "random_rows", ~greedy)
        if penalized.any():
            arrays["penalty_rows"] = np.flatnonzero(penalized)
            arrays["penalty_table_rows"] = ints[penalized, _PENALTY_ROW]
            arrays["penalty_values"] = floats[penalized][:, [_PRESENCE, _FREQUENCY, _REPETITION]].T.copy()
        if blocked.any():
            ids = self._blocked[slots[blocked]]
            arrays["blocked_rows"] = np.flatnonzero(blocked)
            arrays["blocked_ids"] = np.where(ids >= 0, ids, ids[:, :1])
        _add_rows(arrays, "logprob_rows", asking)
        t = _upload(arrays, self.device)
        return SamplingMetadata(
            num_rows=len(req_ids),
            greedy_rows=t.get("greedy_rows"),
            num_greedy=int(greedy.sum()),
            random=self._random_rows(t, widths) if not greedy.all() else None,
            penalties=self._penalties(t) if penalized.any() else None,
            blocked=Blocked(t["blocked_rows"], t["blocked_ids"]) if blocked.any() else None,
            logprobs=_logprob_rows(t, ints[:, _LOGPROBS]) if asking.any() else None,
        )

    def record(self, meta: SamplingMetadata, token_ids: torch.Tensor) -> None:
        """Count this step's sampled ids [B] (on the device) for the rows with penalties."""
        if meta.penalties is not None:
            sampled = token_ids.index_select(0, meta.penalties.rows)
            self.penalties.add_sampled(meta.penalties.table_rows, sampled)

    def _random_arrays(self, arrays: dict[str, np.ndarray], floats: np.ndarray, ints: np.ndarray,
                       outputs: np.ndarray) -> list[int]:
        """The random rows' arrays; returns the width of each filter group (rows with a top-k, rows with only
        a top-p) that has rows."""
        seeded = ints[:, _STREAM] == SEEDED_STREAM
        engine_draws = self._num_draws + np.cumsum(~seeded) - 1
        self._num_draws += int((~seeded).sum())
        arrays["temperature"] = floats[:, _TEMPERATURE]
        arrays["key_words"] = np.stack([ints[:, _STREAM], np.where(seeded, ints[:, _SEED], self.engine_seed),
                                        np.where(seeded, outputs, engine_draws)])
        if (floats[:, _MIN_P] > 0).any():
            arrays["min_p"] = floats[:, _MIN_P]
        top_k, top_p = ints[:, _TOP_K], floats[:, _TOP_P]
        widths = []
        for group, rows in enumerate((top_k > 0, (top_k == 0) & (top_p < 1.0))):
            if rows.any():
                _add_rows(arrays, f"filter_rows{group}", rows)
                arrays[f"top_k{group}"], arrays[f"top_p{group}"] = top_k[rows], top_p[rows]
                widths.append(int(top_k.max()) if group == 0 else self.vocab_size)
        return widths

    def _random_rows(self, t: dict[str, torch.Tensor], widths: list[int]) -> RandomRows:
        groups = [group for group in (0, 1) if f"top_k{group}" in t]
        filters = [Filters(t.get(f"filter_rows{group}"), t[f"top_k{group}"], t[f"top_p{group}"], width)
                   for group, width in zip(groups, widths)]
        stream, seed, counter = t["key_words"]
        keys = row_keys(stream, seed, counter)
        return RandomRows(t.get("random_rows"), t["temperature"], keys, filters, t.get("min_p"))

    def _penalties(self, t: dict[str, torch.Tensor]) -> Penalties:
        table_rows = t["penalty_table_rows"]
        presence, frequency, repetition = t["penalty_values"]
        return Penalties(t["penalty_rows"], table_rows, self.penalties.counts.index_select(0, table_rows),
                         self.penalties.prompt.index_select(0, table_rows), presence, frequency, repetition)

    def _claim_slot(self) -> int:
        if not self._free:
            old = len(self._floats)
            size = max(8, 2 * old)
            self._floats = np.concatenate([self._floats, np.zeros((size - old, 6), np.float32)])
            self._ints = np.concatenate([self._ints, np.full((size - old, 6), -1, np.int64)])
            blocked = np.full((size - old, self._blocked.shape[1]), -1, np.int64)
            self._blocked = np.concatenate([self._blocked, blocked])
            self._free.extend(range(size - 1, old - 1, -1))
        return self._free.pop()

    def _set_blocked(self, slot: int, token_ids: list[int]) -> None:
        if len(token_ids) > self._blocked.shape[1]:
            extra = np.full((len(self._blocked), len(token_ids) - self._blocked.shape[1]), -1, np.int64)
            self._blocked = np.concatenate([self._blocked, extra], axis=1)
        self._blocked[slot] = -1
        self._blocked[slot, : len(token_ids)] = token_ids


def _add_rows(arrays: dict[str, np.ndarray], name: str, mask: np.ndarray) -> None:
    """The rows where mask holds, as an index array, unless that is every row (then the set stays implicit)."""
    if mask.any() and not mask.all():
        arrays[name] = np.flatnonzero(mask)


def _logprob_rows(t: dict[str, torch.Tensor], asked: np.ndarray) -> LogprobRows:
    """The rows asking for logprobs (asked[i] >= 0 alternatives)."""
    positions = np.flatnonzero(asked >= 0)
    return LogprobRows(t.get("logprob_rows"), int(asked[positions].max()), positions.tolist(),
                       asked[positions].tolist())


def _upload(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The arrays as device tensors of the same shapes: one buffer, and one copy, per dtype."""
    tensors = {}
    for dtype in (np.int64, np.float32):
        names = [name for name, array in arrays.items() if array.dtype == dtype]
        if not names:
            continue
        host = np.concatenate([arrays[name].ravel() for name in names])
        buffer = torch.from_numpy(host).to(device, non_blocking=True)
        offset = 0
        for name in names:
            shape = arrays[name].shape
            size = int(np.prod(shape))
            tensors[name] = buffer[offset : offset + size].view(shape)
            offset += size
    return tensors
