"""Preemption by recompute: newest first, to the front of the waiting queue, same outputs after."""

from omnistream.scheduler.request import RequestStatus


def _workload(make_request):
    return [make_request(f"r{i}", [7 * i + k for k in range(5 + 3 * i)], max_tokens=12 + i) for i in range(4)]


def test_newest_is_preempted_and_goes_to_the_front(make_scheduler, make_request, fake_runner, helpers):
    # 7 blocks of 4: three 7-token prompts take 2 blocks each; their decodes soon need a third.
    sched = make_scheduler(num_kv_blocks=7, enable_prefix_caching=False)
    runner = fake_runner(4)
    for name in ("a", "b", "c"):
        sched.add_request(make_request(name, [ord(name)] * 7, max_tokens=10))
    helpers.step(sched, runner)
    plan, _ = helpers.step(sched, runner)  # 8 tokens each: still 2 blocks
    assert plan.preempted_req_ids == []
    plan, _ = helpers.step(sched, runner)  # a and b need a third block: c is preempted for b
    assert plan.preempted_req_ids == ["c"] and set(plan.num_scheduled_tokens) == {"a", "b"}
    c = sched.waiting[0]
    assert c.request_id == "c" and c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert sched.make_stats().num_preemptions == 1
    helpers.complete(sched, runner)


def test_two_preemptions_keep_age_order_in_waiting(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(num_kv_blocks=5, enable_prefix_caching=False)
    runner = fake_runner(4)
    sched.add_request(make_request("a", [1] * 8, max_tokens=8))
    sched.add_request(make_request("b", [2] * 8, max_tokens=8))
    sched.add_request(make_request("c", [3], max_tokens=3))
    helpers.step(sched, runner)  # 2 + 2 + 1 blocks: the pool is full
    plan, _ = helpers.step(sched, runner)  # a needs a block: c goes; b needs one: only b itself is left
    assert plan.preempted_req_ids == ["c", "b"] and list(plan.num_scheduled_tokens) == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    helpers.complete(sched, runner)


def test_outputs_are_the_same_with_and_without_preemption(make_scheduler, make_request, fake_runner, helpers):
    roomy = make_scheduler(num_kv_blocks=64)
    for request in _workload(make_request):
        roomy.add_request(request)
    expected = helpers.complete(roomy, fake_runner(4))
    for caching in (True, False):
        tight = make_scheduler(num_kv_blocks=9, enable_prefix_caching=caching, max_num_batched_tokens=10)
        for request in _workload(make_request):
            tight.add_request(request)
        assert helpers.complete(tight, fake_runner(4)) == expected
        assert tight.make_stats().num_preemptions > 0


def test_resumed_request_is_sent_as_new_with_its_outputs(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(num_kv_blocks=7, enable_prefix_caching=False)
    runner = fake_runner(4)
    for name in ("a", "b", "c"):
        sched.add_request(make_request(name, [ord(name)] * 7, max_tokens=10))
    outputs: dict[str, list[int]] = {}
    for _ in range(3):
        helpers.step(sched, runner, outputs)  # c is preempted in the third step
    known = [ord("c")] * 7 + outputs["c"]
    for _ in range(100):
        plan, _ = helpers.step(sched, runner, outputs)
        resumed = [new for new in plan.scheduled_new_reqs if new.req_id == "c"]
        if resumed:
            assert resumed[0].token_ids == known and resumed[0].num_prompt_tokens == 7
            assert resumed[0].num_computed_tokens == 0
            break
    else:
        raise AssertionError("c was never resumed")
    helpers.complete(sched, runner)


def test_prompt_logprobs_are_not_repeated_after_preemption(make_scheduler, make_request, fake_runner, helpers):
    # p prefills 2 tokens a step and is preempted mid-prefill whenever a needs a block.
    sched = make_scheduler(num_kv_blocks=6, long_prefill_token_threshold=2)
    runner = fake_runner(4)
    sched.add_request(make_request("a", [1] * 4, max_tokens=13))
    sched.add_request(make_request("p", list(range(200, 220)), max_tokens=1, prompt_logprobs=1))
    got: dict[str, list] = {}
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        _, results = helpers.step(sched, runner)
        for result in results:
            got.setdefault(result.req_id, []).extend(result.new_prompt_logprobs)
    assert sched.make_stats().num_preemptions > 0
    assert [lp.token_ids[0] for lp in got["p"]] == list(range(201, 220))
