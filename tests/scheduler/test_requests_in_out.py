"""add_request validation, aborts of waiting and running requests, stats, and no torch import."""

import ast
import pathlib

import pytest

from omnistream.scheduler.request import RequestStatus
from omnistream.scheduler.scheduler import SchedulerConfig


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ([], {}, "prompt is empty"),
        (32, {}, "has 32 tokens, max_model_len is 32"),
        (20, {"max_tokens": 10}, r"20 prompt tokens \+ max_tokens 10 need 8 KV blocks of 4 tokens, .* only 7"),
        (20, {"max_tokens": None}, r"max_tokens 12 need 8 KV blocks"),
        (20, {"max_tokens": 13}, r"max_tokens: .* 20 prompt tokens and asks for max_tokens 13, 33 in all, but "
                                 r"max_model_len is 32; ask for at most 12"),
    ],
)
def test_add_request_rejects(make_scheduler, make_request, prompt, params, match):
    sched = make_scheduler(max_model_len=32, num_kv_blocks=7)
    with pytest.raises(ValueError, match=match):
        sched.add_request(make_request("r", prompt, **params))
    assert not sched.has_unfinished_requests()


def test_exactly_fitting_request_finishes_alone(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(max_model_len=32, num_kv_blocks=7)
    sched.add_request(make_request("r", 20, max_tokens=9))  # KV holds at most 28 tokens = 7 blocks
    assert len(helpers.complete(sched, fake_runner(4))["r"]) == 9


def test_duplicate_id(make_scheduler, make_request):
    sched = make_scheduler()
    sched.add_request(make_request("r", 4))
    with pytest.raises(ValueError, match="duplicate request id 'r'"):
        sched.add_request(make_request("r", 4))


def test_bad_config():
    with pytest.raises(ValueError, match="num_kv_blocks must be at least 1"):
        SchedulerConfig(max_model_len=8, num_kv_blocks=0)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(max_model_len=8, num_kv_blocks=1, long_prefill_token_threshold=-1)


def test_abort_waiting_and_running(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(max_num_seqs=1)
    runner = fake_runner(4)
    sched.add_request(make_request("run", 6, max_tokens=50))
    sched.add_request(make_request("wait", 6))
    helpers.step(sched, runner)
    sched.finish_requests(["wait", "run", "unknown"], RequestStatus.FINISHED_ABORTED)
    sched.finish_requests("run", RequestStatus.FINISHED_ABORTED)  # already finished: ignored
    assert not sched.has_unfinished_requests() and sched.get_request("run") is None
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == sched.config.num_kv_blocks
    plan, _ = helpers.step(sched, runner)
    assert plan.finished_req_ids == ["run", "wait"] and plan.is_empty
    assert helpers.step(sched, runner)[0].finished_req_ids == []


def test_abort_between_schedule_and_update(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler()
    runner = fake_runner(4)
    sched.add_request(make_request("r", 6))
    plan = sched.schedule()
    runner_output = runner.execute(plan)
    sched.finish_requests("r", RequestStatus.FINISHED_STOPPED)  # e.g. a stop string
    assert sched.update_from_output(plan, runner_output) == []
    helpers.invariants(sched)


def test_finish_requests_needs_a_finished_status(make_scheduler):
    with pytest.raises(ValueError, match="finished status"):
        make_scheduler().finish_requests("r", RequestStatus.RUNNING)


def test_stats(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(max_num_seqs=1, num_kv_blocks=10)
    sched.add_request(make_request("a", 8))
    sched.add_request(make_request("b", 8))
    helpers.step(sched, fake_runner(4))
    stats = sched.make_stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (1, 1, 0.2)
    assert sched.get_num_unfinished_requests() == 2


def test_scheduler_package_never_imports_torch():
    folder = pathlib.Path(__file__).parents[2] / "scheduler"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] == "torch" for name in names), path.name
