"""Open-input requests (live sessions): appended input is prefilled without sampling, a committed turn
decodes until a stop and returns to accepting input with its KV kept; idle sessions are preempted first."""

import pytest

from omnistream.scheduler.request import Request, RequestStatus
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.conftest import EOS, FakeRunner, check_invariants, run_step, run_to_completion


def _session(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=1), [EOS], arrival_time=0.0, open_input=True)


def _scheduler(**kwargs) -> Scheduler:
    config = dict(max_model_len=512, num_kv_blocks=64, block_size=4, max_num_batched_tokens=64)
    config.update(kwargs)
    return Scheduler(SchedulerConfig(**config))


def _run_turn(sched: Scheduler, runner: FakeRunner, req_id: str) -> list[int]:
    tokens: list[int] = []
    for _ in range(100):
        _, results = run_step(sched, runner)
        for result in results:
            if result.req_id == req_id:
                tokens.extend(result.new_token_ids)
                if result.finish_reason is not None:
                    assert result.session_open
                    return tokens
    raise AssertionError("the turn never ended")


def _drain(sched: Scheduler, runner: FakeRunner) -> None:
    """Step until nothing is left to compute (open sessions stay open)."""
    for _ in range(1000):
        plan, _ = run_step(sched, runner)
        if plan.is_empty:
            return
    raise AssertionError("work never ran out")


def test_input_is_prefilled_as_it_arrives_and_nothing_is_sampled_until_commit():
    sched, runner = _scheduler(), FakeRunner(4)
    sched.add_request(_session("s", [1, 2, 3]))
    plan, results = run_step(sched, runner)
    assert plan.num_scheduled_tokens == {"s": 3} and plan.no_sample_req_ids == ["s"] and results == []
    plan, _ = run_step(sched, runner)
    assert plan.is_empty  # an idle session costs nothing
    sched.append_input("s", [50, 51, 52])
    plan, results = run_step(sched, runner)
    assert plan.scheduled_cached_reqs[0].new_token_ids == [50, 51, 52] and results == []
    sched.commit_turn("s", [60, 61], SamplingParams(max_tokens=3, ignore_eos=True))
    answer = _run_turn(sched, runner, "s")
    assert len(answer) == 3
    assert not sched.cancel_turn("s")  # the turn is over: nothing to cancel, the session accepts input
    sched.append_input("s", [70])


def test_second_turn_keeps_the_kv_and_equals_one_request_with_the_whole_conversation():
    sched, runner = _scheduler(), FakeRunner(4)
    sched.add_request(_session("s", [1, 2, 3, 4, 5]))
    sched.append_input("s", [6, 7, 8])
    sched.commit_turn("s", [9], SamplingParams(max_tokens=4, ignore_eos=True))
    first = _run_turn(sched, runner, "s")
    computed_before = sched.get_request("s").num_computed_tokens
    sched.append_input("s", [20, 21, 22])
    plan, _ = run_step(sched, runner)
    # only the last answer token (never computed) and the new input: nothing is recomputed
    assert plan.num_scheduled_tokens["s"] == 4 and computed_before == sched.get_request("s").num_tokens - 4
    sched.commit_turn("s", [23], SamplingParams(max_tokens=4, ignore_eos=True))
    second = _run_turn(sched, runner, "s")
    # the fake runner samples from the digest of all tokens: same conversation -> same answer
    whole = [1, 2, 3, 4, 5, 6, 7, 8, 9] + first + [20, 21, 22, 23]
    other, other_runner = _scheduler(), FakeRunner(4)
    other.add_request(Request("r", whole, SamplingParams(max_tokens=4, ignore_eos=True), [EOS], 0.0))
    assert run_to_completion(other, other_runner)["r"] == second


def test_generation_is_rejected_while_accepting_and_input_while_generating():
    sched, runner = _scheduler(), FakeRunner(4)
    sched.add_request(_session("s", [1, 2]))
    sched.commit_turn("s", [3], SamplingParams(max_tokens=50, ignore_eos=True))
    run_step(sched, runner)
    with pytest.raises(ValueError, match="is generating"):
        sched.append_input("s", [4])
    assert sched.cancel_turn("s")  # barge-in: the answer stops, the session accepts input again
    sched.append_input("s", [4])
    plan, results = run_step(sched, runner)
    assert results == [] and "s" in plan.no_sample_req_ids


def test_cancel_frees_every_block_and_max_model_len_ends_the_session():
    sched, runner = _scheduler(max_model_len=12), FakeRunner(4)
    sched.add_request(_session("s", [1, 2, 3, 4, 5]))
    sched.append_input("s", [6, 7, 8, 9])
    sched.commit_turn("s", [10], SamplingParams(max_tokens=None, ignore_eos=True))
    outputs = run_to_completion(sched, runner)
    assert len(outputs["s"]) == 2  # the rest of max_model_len, and the session is over
    assert sched.get_request("s") is None
    sched, runner = _scheduler(), FakeRunner(4)
    sched.add_request(_session("t", [1, 2, 3]))
    sched.append_input("t", list(range(20, 30)))
    run_step(sched, runner)
    sched.finish_requests("t", sched.get_request("t").status.FINISHED_ABORTED)
    run_step(sched, runner)
    check_invariants(sched)
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 64


def test_a_commit_whose_max_tokens_does_not_fit_is_refused_and_the_turn_stays_open():
    sched = _scheduler(max_model_len=12)
    sched.add_request(_session("s", [1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match=r"max_tokens: .* 6 prompt tokens .* max_tokens 7, 13 in all.* at most 6"):
        sched.commit_turn("s", [10], SamplingParams(max_tokens=7))
    sched.commit_turn("s", [10], SamplingParams(max_tokens=6, ignore_eos=True))  # exactly fits
    assert len(run_to_completion(sched, FakeRunner(4))["s"]) == 6


def test_too_long_input_is_refused():
    sched = _scheduler(max_model_len=10)
    sched.add_request(_session("s", [1, 2]))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.append_input("s", list(range(20)))
    assert sched.get_request("s").num_tokens == 2  # nothing was appended


def test_idle_sessions_lose_their_kv_first_and_live_input_goes_before_plain_prefill():
    sched, runner = _scheduler(num_kv_blocks=12, max_num_batched_tokens=16), FakeRunner(4)
    sched.add_request(_session("idle", list(range(1, 17))))  # 4 blocks, then idle
    run_step(sched, runner)
    run_step(sched, runner)
    sched.add_request(Request("busy", list(range(100, 140)), SamplingParams(max_tokens=4, ignore_eos=True), [EOS], 1.0))
    plan, _ = run_step(sched, runner)
    assert "busy" in plan.num_scheduled_tokens
    for _ in range(3):
        plan, _ = run_step(sched, runner)
        if plan.preempted_req_ids:
            break
    assert plan.preempted_req_ids == ["idle"]
    _drain(sched, runner)
    assert sched.get_request("busy") is None
    sched.append_input("idle", [7])  # the session comes back (through the prefix cache)
    _drain(sched, runner)
    assert sched.get_request("idle").num_computed_tokens == sched.get_request("idle").num_tokens


@pytest.mark.parametrize("budget", [64, 8, 6])
def test_live_input_is_scheduled_every_step_alongside_running_decodes(budget):
    """One live session gets 5 new tokens before every step while 3 requests decode: each step runs all
    3 decodes and (budget allowing) all of the session's new input; with a budget short of that, the
    decodes still all run and the session gets the rest, so its input never waits a whole step unscheduled."""
    sched, runner = _scheduler(num_kv_blocks=128, max_num_batched_tokens=budget), FakeRunner(4)
    for i in range(3):
        sched.add_request(Request(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), [EOS], 0.0))
    sched.add_request(_session("s", [1, 2]))
    while any(sched.get_request(f"r{i}").num_output_tokens == 0 for i in range(3)):
        run_step(sched, runner)  # prefill everything first
    session = sched.get_request("s")
    for step in range(25):
        sched.append_input("s", list(range(200 + 5 * step, 205 + 5 * step)))
        pending = session.num_tokens - session.num_computed_tokens
        num_lags = len(sched.stream_lags)
        plan, _ = run_step(sched, runner)
        scheduled = plan.num_scheduled_tokens
        assert all(scheduled.get(f"r{i}") == 1 for i in range(3)), scheduled  # every decode, every step
        assert "s" in plan.no_sample_req_ids
        assert scheduled.get("s") == min(budget - 3, pending), scheduled  # all the rest of the budget
        if budget >= 8:
            assert pending == 5 and session.pending_since is None  # this step's input ran in this step
            assert len(sched.stream_lags) == num_lags + 1
        else:
            assert scheduled["s"] > 0  # short of budget: a part of the pending input every step
    stats = sched.lag_percentiles()
    assert stats["count"] > 0 and stats["max"] < 1.0  # appended and scheduled at once: no lag to speak of


def test_lag_percentiles_summarise_stream_lags():
    sched = _scheduler()
    assert sched.lag_percentiles() == {"count": 0, "p50": None, "p99": None, "max": None}
    sched.stream_lags.extend(i / 100 for i in range(100, 0, -1))  # 0.01 .. 1.00, unordered
    stats = sched.lag_percentiles((50, 90, 99))
    assert stats == {"count": 100, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
    sched.stream_lags.clear()
    sched.stream_lags.append(0.25)
    assert sched.lag_percentiles() == {"count": 1, "p50": 0.25, "p99": 0.25, "max": 0.25}
    with pytest.raises(ValueError):
        sched.lag_percentiles((101,))


def test_live_prefill_counts_only_input_prefilled_before_the_commit():
    sched, runner = _scheduler(), FakeRunner(4)
    sched.add_request(_session("s", [1, 2, 3]))
    sched.add_request(Request("r", [9, 9], SamplingParams(max_tokens=2, ignore_eos=True), [EOS], arrival_time=0.0))
    run_step(sched, runner)
    sched.append_input("s", [50, 51])
    run_step(sched, runner)
    assert sched.make_stats().num_live_prefill_tokens == 5  # the ordinary request's prompt is not counted
    sched.commit_turn("s", [60, 61], SamplingParams(max_tokens=2, ignore_eos=True))
    _run_turn(sched, runner, "s")
    assert sched.make_stats().num_live_prefill_tokens == 5  # the commit's own tokens are not live input


def test_aborts_of_unfinished_requests_are_counted_once():
    sched, runner = _scheduler(), FakeRunner(4)
    sched.add_request(_session("s", [1, 2, 3]))
    sched.add_request(Request("r", [9, 9], SamplingParams(max_tokens=1), [EOS], arrival_time=0.0))
    run_step(sched, runner)
    sched.finish_requests(["s", "r", "unknown"], RequestStatus.FINISHED_ABORTED)
    sched.finish_requests(["s"], RequestStatus.FINISHED_ABORTED)
    assert sched.make_stats().num_aborted_requests == 1  # "r" had finished by itself, "s" counts once
