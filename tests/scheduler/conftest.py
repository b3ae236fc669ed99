"""Fixtures for scheduler tests: request/scheduler factories and a fake model runner that mirrors
the SchedulerOutput contract, simulates the paged KV, and checks every step for consistency."""

from __future__ import annotations

import hashlib

import pytest

from omnistream.scheduler.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from omnistream.scheduler.request import Request
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig

EOS = 2
VOCAB = 1000  # fake sampled tokens lie in [100, VOCAB): never EOS unless scripted


def _digest(parent: bytes, token: int) -> bytes:
    return hashlib.blake2b(parent + token.to_bytes(8, "little"), digest_size=8).digest()


class _RunnerRequest:
    def __init__(self, token_ids: list[int], num_prompt_tokens: int, params: SamplingParams, block_ids: list[int],
                 computed: int, features=()):
        self.features = list(features)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = num_prompt_tokens
        self.params = params
        self.block_ids = list(block_ids)
        self.num_computed_tokens = computed
        self.digests: list[bytes] = []  # digests[p] identifies token p and everything before it

    def digest(self, position: int) -> bytes:
        while len(self.digests) <= position:
            parent = self.digests[-1] if self.digests else b""
            self.digests.append(_digest(parent, self.token_ids[len(self.digests)]))
        return self.digests[position]


class FakeRunner:
    """Keeps its own per-request token lists from the SchedulerOutput alone, writes a digest of each
    computed position into a fake paged KV and checks every read, then "samples" a token that is a
    deterministic function of the request's tokens (or the next one of a script)."""

    def __init__(self, block_size: int, scripts: dict[str, list[int]] | None = None):
        self.block_size = block_size
        self.scripts = {req_id: list(tokens) for req_id, tokens in (scripts or {}).items()}
        self.reqs: dict[str, _RunnerRequest] = {}
        self.kv: dict[tuple[int, int], bytes] = {}  # (block id, slot) -> digest
        self.encoded: set[str] = set()  # media identifiers whose encoder output this runner holds
        self.num_encoder_runs = 0

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        for req_id in out.finished_req_ids:
            self.reqs.pop(req_id, None)
        resent = {new.req_id for new in out.scheduled_new_reqs}  # dropped and sent whole again (input rollback)
        for req_id in out.preempted_req_ids:
            assert req_id not in out.num_scheduled_tokens or req_id in resent
            del self.reqs[req_id]
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.reqs, "a request the runner holds was sent as new"
            assert new.num_computed_tokens < len(new.token_ids)
            self.reqs[new.req_id] = _RunnerRequest(
                new.token_ids, new.num_prompt_tokens, new.sampling_params, new.block_ids, new.num_computed_tokens,
                new.mm_features,
            )
        for cached in out.scheduled_cached_reqs:
            req = self.reqs[cached.req_id]
            assert req.num_computed_tokens == cached.num_computed_tokens
            req.token_ids.extend(cached.new_token_ids)
            req.block_ids.extend(cached.new_block_ids)
            req.features.extend(cached.new_mm_features)
            req.num_prompt_tokens = cached.num_prompt_tokens
            if cached.new_sampling_params is not None:
                req.params = cached.new_sampling_params
        scheduled_ids = {r.req_id for r in out.scheduled_new_reqs} | {r.req_id for r in out.scheduled_cached_reqs}
        assert scheduled_ids == set(out.num_scheduled_tokens)

        # Encoder outputs: evictions first, then this step's encodes; every media row computed must be there.
        self.encoded -= set(out.freed_encoder_ids)
        for req_id, indices in out.scheduled_encoder_inputs.items():
            for index in indices:
                identifier = self.reqs[req_id].features[index].identifier
                assert identifier not in self.encoded, f"{identifier} encoded twice while cached"
                self.encoded.add(identifier)
                self.num_encoder_runs += 1
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.reqs[req_id]
            for feature in req.features:
                if feature.overlaps(req.num_computed_tokens, req.num_computed_tokens + n):
                    assert feature.identifier in self.encoded, f"{req_id}: {feature.identifier} not encoded"

        # Write every scheduled position's KV first (as a layer does for the whole batch), then read.
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.reqs[req_id]
            assert n > 0 and req.num_computed_tokens + n <= len(req.token_ids)
            assert len(req.block_ids) * self.block_size >= req.num_computed_tokens + n
            for p in range(req.num_computed_tokens, req.num_computed_tokens + n):
                self.kv[self._slot(req, p)] = req.digest(p)
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.reqs[req_id]
            for p in range(req.num_computed_tokens + n):
                assert self.kv.get(self._slot(req, p)) == req.digest(p), f"{req_id}: KV at position {p} is wrong"

        sampled_ids, sampled, logprobs, prompt_logprobs = [], [], [], {}
        for req_id, n in out.num_scheduled_tokens.items():
            req = self.reqs[req_id]
            start, req.num_computed_tokens = req.num_computed_tokens, req.num_computed_tokens + n
            if req.params.prompt_logprobs is not None:
                positions = range(start + 1, min(req.num_computed_tokens, req.num_prompt_tokens - 1) + 1)
                if positions:
                    prompt_logprobs[req_id] = [TokenLogprobs([req.token_ids[p]], [-1.0], [1]) for p in positions]
            if req.num_computed_tokens == len(req.token_ids) and req_id not in out.no_sample_req_ids:
                token = self._sample(req_id, req)
                sampled_ids.append(req_id)
                sampled.append(token)
                logprobs.append(None if req.params.logprobs is None else TokenLogprobs([token], [-0.5], [1]))
        return ModelRunnerOutput(
            sampled_req_ids=sampled_ids, sampled_token_ids=sampled, logprobs=logprobs, prompt_logprobs=prompt_logprobs
        )

    def _slot(self, req: _RunnerRequest, position: int) -> tuple[int, int]:
        return req.block_ids[position // self.block_size], position % self.block_size

    def _sample(self, req_id: str, req: _RunnerRequest) -> int:
        script = self.scripts.get(req_id)
        if script:
            return script.pop(0)
        return 100 + int.from_bytes(req.digest(len(req.token_ids) - 1), "little") % (VOCAB - 100)


def check_invariants(sched: Scheduler) -> None:
    """Block accounting and queue invariants that must hold between any two calls."""
    cfg = sched.config
    pool = sched.kv_cache_manager.block_pool
    refs: dict[int, int] = {}
    for request in sched.running:
        ids = sched.kv_cache_manager.get_block_ids(request)
        assert len(ids) == len(set(ids))
        assert len(ids) * cfg.block_size >= request.num_computed_tokens
        assert request.num_computed_tokens <= request.num_tokens
        for block_id in ids:
            refs[block_id] = refs.get(block_id, 0) + 1
    for request in sched.waiting:
        assert sched.kv_cache_manager.get_block_ids(request) == []
        assert request.num_computed_tokens == 0
    for block in pool.blocks:
        assert block.ref_cnt == refs.get(block.block_id, 0)
    assert pool.get_num_free_blocks() == cfg.num_kv_blocks - len(refs)
    assert len(sched.running) <= cfg.max_num_seqs
    assert len(sched.running) + len(sched.waiting) == sched.get_num_unfinished_requests()


def run_step(sched: Scheduler, runner: FakeRunner, outputs: dict[str, list[int]] | None = None):
    """One engine step; appends each request's new tokens to `outputs` and returns (plan, results)."""
    plan = sched.schedule()
    assert plan.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
    results = sched.update_from_output(plan, runner.execute(plan))
    if outputs is not None:
        for result in results:
            outputs.setdefault(result.req_id, []).extend(result.new_token_ids)
    check_invariants(sched)
    return plan, results


def run_to_completion(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        run_step(sched, runner, outputs)
    assert not sched.has_unfinished_requests()
    sched.schedule()  # delivers the last finished ids
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == sched.config.num_kv_blocks
    return outputs


@pytest.fixture
def make_request():
    def make(req_id: str, prompt: list[int] | int, **params) -> Request:
        extra_keys = params.pop("extra_keys", ())
        eos = params.pop("eos_token_ids", [EOS])
        params.setdefault("max_tokens", 8)
        tokens = list(range(10, 10 + prompt)) if isinstance(prompt, int) else prompt
        return Request(req_id, tokens, SamplingParams(**params), eos, arrival_time=0.0, extra_keys=extra_keys)

    return make


@pytest.fixture
def make_scheduler():
    def make(**overrides) -> Scheduler:
        config = dict(max_model_len=256, num_kv_blocks=64, block_size=4, max_num_batched_tokens=64)
        config.update(overrides)
        return Scheduler(SchedulerConfig(**config))

    return make


@pytest.fixture
def fake_runner():
    return FakeRunner


@pytest.fixture
def helpers():
    """The step drivers, for tests (test modules cannot import each other under importlib mode)."""

    class Helpers:
        step = staticmethod(run_step)
        complete = staticmethod(run_to_completion)
        invariants = staticmethod(check_invariants)

    return Helpers
