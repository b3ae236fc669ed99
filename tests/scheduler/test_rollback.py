"""Rolling back a live session's uncommitted input: the tokens, media and position segments after the cut are
gone, blocks past the last full block kept are freed, and the next turn equals a session that never had the
discarded input (the fake runner checks every KV read and samples from the digest of all tokens)."""

import pytest

from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.request import Request
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig
from omnistream.scheduler.tensor_data import PositionSegment, TensorData
from tests.scheduler.conftest import EOS, FakeRunner, run_step

BLOCK = 4
ANSWER = SamplingParams(max_tokens=4, ignore_eos=True)


def _scheduler(prefix_caching: bool = False) -> Scheduler:
    return Scheduler(SchedulerConfig(max_model_len=512, num_kv_blocks=64, block_size=BLOCK, max_num_batched_tokens=64,
                                     enable_prefix_caching=prefix_caching))


def _open(sched: Scheduler, req_id: str, prompt: list[int]) -> None:
    sched.add_request(Request(req_id, prompt, SamplingParams(max_tokens=1), [EOS], arrival_time=0.0, open_input=True))


def _media(sched: Scheduler, req_id: str, name: str, length: int) -> None:
    """Append a medium of `length` placeholder tokens with its own position segment."""
    start = sched.get_request(req_id).num_tokens
    feature = MultiModalFeature(modality="audio", identifier=f"{name}-{length}", offset=start, length=length)
    positions = TensorData(dtype="float32", shape=[3, length], data=bytes(12 * length))
    sched.append_input(req_id, [7] * length, [feature], [PositionSegment(start=start, positions=positions)])


def _answer(sched: Scheduler, runner: FakeRunner, req_id: str) -> list[int]:
    sched.commit_turn(req_id, [60, 61], ANSWER)
    tokens: list[int] = []
    for _ in range(100):
        _, results = run_step(sched, runner)
        for result in results:
            if result.req_id == req_id:
                tokens += result.new_token_ids
                if result.finish_reason is not None:
                    return tokens
    raise AssertionError("the turn never ended")


def _drain(sched: Scheduler, runner: FakeRunner) -> None:
    for _ in range(100):
        if run_step(sched, runner)[0].is_empty:
            return
    raise AssertionError("work never ran out")


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
@pytest.mark.parametrize("prefilled", [True, False], ids=["prefilled", "not-yet-scheduled"])
def test_next_turn_equals_a_session_that_never_had_the_discarded_input(prefix_caching, prefilled):
    sched, runner = _scheduler(prefix_caching), FakeRunner(BLOCK)
    _open(sched, "s", [1, 2, 3, 4, 5])
    _media(sched, "s", "kept", 6)
    _drain(sched, runner)
    first = _answer(sched, runner, "s")
    sched.append_input("s", [20, 21, 22])  # the next user turn's opening text (kept)
    cut = sched.get_request("s").num_tokens  # 5 + 6 + 2 + 4 + 3 = 20: block-aligned at BLOCK=4 plus one more
    sched.append_input("s", [30])
    cut += 1
    _media(sched, "s", "discarded", 9)
    _media(sched, "s", "discarded-too", 5)
    if prefilled:
        _drain(sched, runner)
    blocks_before = len(sched.kv_cache_manager.get_block_ids(sched.get_request("s")))
    sched.rollback_input("s", cut)
    request = sched.get_request("s")
    assert request.num_tokens == cut and request.num_prompt_tokens == cut
    assert [f.identifier for f in request.mm_features] == ["kept-6"]
    assert [s.start for s in request.position_segments] == [5]
    kept_blocks = len(sched.kv_cache_manager.get_block_ids(request))
    assert kept_blocks == (cut // BLOCK if prefilled else min(blocks_before, cut // BLOCK))
    assert request.num_computed_tokens <= cut // BLOCK * BLOCK
    plan, _ = run_step(sched, runner)
    if prefilled:  # the runner got the request again in full (and dropped its old copy first)
        assert "s" in plan.preempted_req_ids and [r.req_id for r in plan.scheduled_new_reqs] == ["s"]
        assert plan.num_scheduled_tokens["s"] == cut - cut // BLOCK * BLOCK  # only the partial block is redone
    _media(sched, "s", "new", 7)
    second = _answer(sched, runner, "s")

    other, other_runner = _scheduler(prefix_caching), FakeRunner(BLOCK)  # never saw the discarded input
    _open(other, "s", [1, 2, 3, 4, 5])
    _media(other, "s", "kept", 6)
    assert _answer(other, other_runner, "s") == first
    other.append_input("s", [20, 21, 22, 30])
    _media(other, "s", "new", 7)
    assert _answer(other, other_runner, "s") == second
    assert other.get_request("s").all_token_ids == sched.get_request("s").all_token_ids


def test_rollback_frees_the_blocks_and_media_it_drops():
    sched, runner = _scheduler(), FakeRunner(BLOCK)
    _open(sched, "s", [1, 2, 3])
    _media(sched, "s", "a", 20)
    _drain(sched, runner)
    pool = sched.kv_cache_manager.block_pool
    free_before = pool.get_num_free_blocks()
    sched.rollback_input("s", 3)
    assert pool.get_num_free_blocks() == free_before + 6  # 23 tokens held 6 blocks, 3 tokens keep none full
    assert sched.get_request("s").num_computed_tokens == 0
    sched.rollback_input("s", 3)  # nothing more to drop
    assert sched.get_request("s").all_token_ids == [1, 2, 3]


def test_rollback_refuses_bad_cuts_and_answering_sessions():
    sched = _scheduler()
    _open(sched, "s", [1, 2, 3])
    _media(sched, "s", "a", 8)
    with pytest.raises(ValueError, match="split the medium"):
        sched.rollback_input("s", 6)
    with pytest.raises(ValueError, match="cannot roll back"):
        sched.rollback_input("s", 12)
    with pytest.raises(ValueError, match="no open session"):
        sched.rollback_input("missing", 0)
    sched.commit_turn("s", [9], ANSWER)
    with pytest.raises(ValueError, match="generating"):
        sched.rollback_input("s", 3)
    assert sched.get_request("s").num_tokens == 12  # nothing changed
