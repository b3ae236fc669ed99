"""Prefix caching through the scheduler: hits, misses on other prefixes or media keys, LRU eviction."""


def _finish(sched, runner, helpers, request):
    sched.add_request(request)
    helpers.complete(sched, runner)


def test_same_prefix_hits_full_blocks(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler()
    runner = fake_runner(4)
    _finish(sched, runner, helpers, make_request("a", list(range(100, 111)), max_tokens=2))
    sched.add_request(make_request("b", list(range(100, 110)) + [999, 998], max_tokens=2))
    plan, results = helpers.step(sched, runner)
    (new,) = plan.scheduled_new_reqs
    assert new.num_computed_tokens == 8 and plan.num_scheduled_tokens["b"] == 4
    assert results[0].num_cached_tokens == 8
    stats = sched.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (11 + 12, 8)
    helpers.complete(sched, runner)


def test_outputs_extend_the_cached_prefix(make_scheduler, make_request, fake_runner, helpers):
    # A follow-up turn whose prompt is an earlier prompt + its answer hits blocks filled by decode.
    sched = make_scheduler()
    runner = fake_runner(4)
    first = make_request("a", list(range(100, 106)), max_tokens=6)
    sched.add_request(first)
    outputs = helpers.complete(sched, runner)
    follow_up = list(range(100, 106)) + outputs["a"] + [5, 6, 7]
    sched.add_request(make_request("b", follow_up))
    plan, _ = helpers.step(sched, runner)
    assert plan.scheduled_new_reqs[0].num_computed_tokens == 8  # 11 computed tokens: 2 full blocks


def test_different_prefix_or_extra_keys_miss(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler()
    runner = fake_runner(4)
    prompt = list(range(100, 113))
    _finish(sched, runner, helpers, make_request("a", prompt, extra_keys=("img:1",)))
    for name, request in [
        ("other-prefix", make_request("b", [1] + prompt[1:], extra_keys=("img:1",))),
        ("other-media", make_request("c", prompt, extra_keys=("img:2",))),
        ("no-media", make_request("d", prompt)),
    ]:
        sched.add_request(request)
        plan, _ = helpers.step(sched, runner)
        assert plan.scheduled_new_reqs[0].num_computed_tokens == 0, name
        helpers.complete(sched, runner)
    sched.add_request(make_request("e", prompt, extra_keys=("img:1",)))
    assert helpers.step(sched, runner)[0].scheduled_new_reqs[0].num_computed_tokens == 12


def test_lru_free_cached_blocks_are_evicted_first(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(num_kv_blocks=6)
    runner = fake_runner(4)
    old, new = list(range(100, 109)), list(range(200, 209))
    _finish(sched, runner, helpers, make_request("old", old, max_tokens=1))  # 2 cached blocks + 1 partial
    _finish(sched, runner, helpers, make_request("new", new, max_tokens=1))
    # Free queue: old's blocks tail first (partial, 2nd, 1st), then new's. A 5-token stranger takes
    # two blocks from the head: old's partial and 2nd block; old's 1st block and all of new survive.
    _finish(sched, runner, helpers, make_request("x", list(range(300, 305)), max_tokens=1))
    kv = sched.kv_cache_manager
    assert kv.get_computed_blocks(make_request("new2", new))[1] == 8
    assert kv.get_computed_blocks(make_request("old2", old))[1] == 4


def test_disabled_prefix_cache_never_hits(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(enable_prefix_caching=False)
    runner = fake_runner(4)
    _finish(sched, runner, helpers, make_request("a", 13))
    sched.add_request(make_request("b", 13))
    assert helpers.step(sched, runner)[0].scheduled_new_reqs[0].num_computed_tokens == 0
    assert sched.make_stats().prefix_cache_queries == 0
