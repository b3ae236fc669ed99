"""One token budget per step: running requests first, chunked prefill, long-prefill cap, max_num_seqs."""


def test_decodes_first_then_chunked_prefill_within_budget(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(max_num_batched_tokens=16)
    runner = fake_runner(4)
    for i in range(3):
        sched.add_request(make_request(f"d{i}", 4, max_tokens=20))
    plan, _ = helpers.step(sched, runner)
    assert plan.num_scheduled_tokens == {"d0": 4, "d1": 4, "d2": 4}
    sched.add_request(make_request("long", list(range(500, 530))))  # no prefix shared with d*
    plan, _ = helpers.step(sched, runner)
    # Three decodes of one token each first, then the prefill gets the rest of the budget.
    assert list(plan.num_scheduled_tokens.items()) == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 13)]
    plan, _ = helpers.step(sched, runner)
    assert list(plan.num_scheduled_tokens.items()) == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 13)]
    plan, results = helpers.step(sched, runner)
    assert plan.num_scheduled_tokens["long"] == 4 and plan.total_num_scheduled_tokens == 7
    assert "long" in {r.req_id for r in results}  # the last chunk samples


def test_long_prompt_is_chunked_across_steps(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(max_num_batched_tokens=8)
    runner = fake_runner(4)
    sched.add_request(make_request("a", 21, max_tokens=2))
    chunks, sampled = [], []
    for _ in range(3):
        plan, results = helpers.step(sched, runner)
        chunks.append(plan.num_scheduled_tokens["a"])
        sampled.append(bool(results))
    assert chunks == [8, 8, 5] and sampled == [False, False, True]
    plan, _ = helpers.step(sched, runner)
    assert plan.num_scheduled_tokens == {"a": 1} and plan.scheduled_cached_reqs[0].num_computed_tokens == 21
    assert not sched.has_unfinished_requests()


def test_long_prefill_threshold_caps_each_chunk(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=6)
    runner = fake_runner(4)
    sched.add_request(make_request("a", 14))
    sched.add_request(make_request("b", 3))
    plan, _ = helpers.step(sched, runner)
    assert plan.num_scheduled_tokens == {"a": 6, "b": 3}
    plan, _ = helpers.step(sched, runner)
    assert plan.num_scheduled_tokens == {"a": 6, "b": 1}
    plan, _ = helpers.step(sched, runner)
    assert plan.num_scheduled_tokens == {"a": 2, "b": 1}


def test_max_num_seqs_limits_running(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(max_num_seqs=2)
    runner = fake_runner(4)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 5, max_tokens=2))
    plan, _ = helpers.step(sched, runner)
    assert set(plan.num_scheduled_tokens) == {"r0", "r1"} and len(sched.waiting) == 1
    plan, _ = helpers.step(sched, runner)  # r0 and r1 finish here (2 tokens each)
    assert set(plan.num_scheduled_tokens) == {"r0", "r1"}
    plan, _ = helpers.step(sched, runner)
    assert set(plan.num_scheduled_tokens) == {"r2"} and sorted(plan.finished_req_ids) == ["r0", "r1"]
    helpers.complete(sched, runner)


def test_output_contract_new_then_cached(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler()
    runner = fake_runner(4)
    sched.add_request(make_request("a", 6, max_tokens=4))
    plan, results = helpers.step(sched, runner)
    (new,) = plan.scheduled_new_reqs
    assert new.token_ids == list(range(10, 16)) and new.num_prompt_tokens == 6
    assert new.num_computed_tokens == 0 and len(new.block_ids) == 2
    token = results[0].new_token_ids[0]
    plan, _ = helpers.step(sched, runner)
    (cached,) = plan.scheduled_cached_reqs
    assert cached.new_token_ids == [token] and cached.num_computed_tokens == 6
    assert cached.new_block_ids == [] and plan.scheduled_new_reqs == []
    helpers.step(sched, runner)  # computes position 7: still two blocks
    plan, _ = helpers.step(sched, runner)  # computes position 8: a third block
    assert len(plan.scheduled_cached_reqs[0].new_block_ids) == 1


def test_empty_step(make_scheduler, fake_runner, helpers):
    sched = make_scheduler()
    plan, results = helpers.step(sched, fake_runner(4))
    assert plan.is_empty and results == []
