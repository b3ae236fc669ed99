"""Media in the scheduler: encoder budget, encoder-output cache by content hash, media-aware prefix caching."""

from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.request import Request
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.conftest import FakeRunner, run_step, run_to_completion

PAD = 7


def _request(req_id: str, media: list[tuple[str, int, int]], length: int, max_tokens: int = 3) -> Request:
    """A prompt of `length` tokens with media (identifier, offset, rows) as runs of PAD tokens."""
    tokens = [10 + (i % 50) for i in range(length)]
    features = []
    for identifier, offset, rows in media:
        tokens[offset : offset + rows] = [PAD] * rows
        features.append(MultiModalFeature(modality="image", identifier=identifier, offset=offset, length=rows))
    return Request(req_id, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), [2], 0.0,
                   mm_features=features)


def _scheduler(**kwargs) -> Scheduler:
    config = dict(max_model_len=1024, num_kv_blocks=200, block_size=16, max_num_batched_tokens=64)
    config.update(kwargs)
    return Scheduler(SchedulerConfig(**config))


def test_media_is_encoded_once_when_its_span_is_first_reached_and_chunking_cuts_through_it():
    sched, runner = _scheduler(), FakeRunner(16)
    sched.add_request(_request("a", [("img", 40, 50)], 120))
    plan, _ = run_step(sched, runner)  # tokens [0, 64) reach into the image span [40, 90)
    assert plan.scheduled_encoder_inputs == {"a": [0]}
    plan, _ = run_step(sched, runner)  # [64, 120): the rest of the span, from the cache
    assert plan.scheduled_encoder_inputs == {}
    run_to_completion(sched, runner)
    assert runner.num_encoder_runs == 1


def test_encoder_budget_cuts_the_prefill_before_media_that_do_not_fit():
    sched, runner = _scheduler(max_num_batched_tokens=200, max_num_encoder_tokens=60), FakeRunner(16)
    sched.add_request(_request("a", [("x", 10, 50)], 80))
    sched.add_request(_request("b", [("y", 20, 50)], 80))
    plan, _ = run_step(sched, runner)
    assert plan.scheduled_encoder_inputs == {"a": [0]}
    assert plan.num_scheduled_tokens == {"a": 80, "b": 20}  # b stops right before its image
    plan, _ = run_step(sched, runner)
    assert plan.scheduled_encoder_inputs == {"b": [0]}
    run_to_completion(sched, runner)


def test_an_item_larger_than_the_encoder_budget_and_cache_still_runs_alone():
    sched, runner = _scheduler(max_num_batched_tokens=64, max_num_encoder_tokens=16, encoder_cache_size=16), FakeRunner(16)
    sched.add_request(_request("a", [("big", 5, 100)], 130))
    outputs = run_to_completion(sched, runner)
    assert len(outputs["a"]) == 3 and runner.num_encoder_runs == 1


def test_the_same_media_in_two_requests_is_encoded_once_in_the_same_step_and_later():
    sched, runner = _scheduler(max_num_batched_tokens=512), FakeRunner(16)
    sched.add_request(_request("a", [("same", 3, 40)], 60))
    sched.add_request(_request("b", [("same", 10, 40)], 70))
    plan, _ = run_step(sched, runner)
    assert plan.scheduled_encoder_inputs == {"a": [0]}
    run_to_completion(sched, runner)
    sched.add_request(_request("c", [("same", 0, 40)], 50))
    run_to_completion(sched, runner)
    stats = sched.make_stats()
    assert runner.num_encoder_runs == 1 and stats.num_encoded_media == 1 and stats.encoder_cache_hits == 2


def test_unused_outputs_are_evicted_lru_and_the_runner_is_told():
    sched, runner = _scheduler(max_num_batched_tokens=128, encoder_cache_size=100), FakeRunner(16)
    sched.add_request(_request("a", [("first", 0, 60)], 70))
    run_to_completion(sched, runner)
    sched.add_request(_request("b", [("second", 0, 60)], 70))
    plan, _ = run_step(sched, runner)
    assert plan.freed_encoder_ids == ["first"]
    assert runner.encoded == {"second"}
    run_to_completion(sched, runner)


def test_prefix_cache_reuses_blocks_only_for_the_same_media():
    sched, runner = _scheduler(), FakeRunner(16)
    sched.add_request(_request("a", [("cat", 16, 32)], 80))
    run_to_completion(sched, runner)
    sched.add_request(_request("b", [("dog", 16, 32)], 80))  # same token ids, different image
    run_step(sched, runner)
    assert sched.get_request("b").num_cached_tokens == 16  # only the block before the image
    run_to_completion(sched, runner)
    sched.add_request(_request("c", [("cat", 16, 32)], 80))
    run_step(sched, runner)
    assert sched.get_request("c").num_cached_tokens == 64  # every full block up to the last token
