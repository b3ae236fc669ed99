"""Stop conditions, in order: stop_token_ids, EOS (both after min_tokens), max_tokens, max_model_len."""

EOS = 2


def _run(make_scheduler, make_request, fake_runner, helpers, script, max_model_len=256, **params):
    sched = make_scheduler(max_model_len=max_model_len)
    sched.add_request(make_request("r", 5, **params))
    runner = fake_runner(4, scripts={"r": list(script)})
    last = None
    while sched.has_unfinished_requests():
        _, results = helpers.step(sched, runner)
        last = results[-1] if results else last
    helpers.complete(sched, runner)
    return last


def test_eos_stops(make_scheduler, make_request, fake_runner, helpers):
    last = _run(make_scheduler, make_request, fake_runner, helpers, [7, EOS, 8], max_tokens=10)
    assert last.new_token_ids == [EOS] and last.finish_reason == "stop" and last.stop_reason is None


def test_stop_token_id_reports_the_token(make_scheduler, make_request, fake_runner, helpers):
    last = _run(make_scheduler, make_request, fake_runner, helpers, [7, 9, 8], max_tokens=10, stop_token_ids=[9])
    assert last.finish_reason == "stop" and last.stop_reason == 9


def test_stop_token_id_is_checked_before_eos(make_scheduler, make_request, fake_runner, helpers):
    last = _run(make_scheduler, make_request, fake_runner, helpers, [EOS], stop_token_ids=[EOS])
    assert last.stop_reason == EOS


def test_min_tokens_defers_eos_and_stop_ids(make_scheduler, make_request, fake_runner, helpers):
    script = [EOS, 9, 5, EOS]
    last = _run(make_scheduler, make_request, fake_runner, helpers, script, min_tokens=3, stop_token_ids=[9])
    assert last.new_token_ids == [EOS] and last.finish_reason == "stop"  # the 4th token


def test_ignore_eos_runs_to_max_tokens(make_scheduler, make_request, fake_runner, helpers):
    last = _run(make_scheduler, make_request, fake_runner, helpers, [EOS] * 4, max_tokens=4, ignore_eos=True)
    assert last.finish_reason == "length"


def test_max_tokens(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler()
    sched.add_request(make_request("r", 5, max_tokens=3))
    outputs = helpers.complete(sched, fake_runner(4))
    assert len(outputs["r"]) == 3


def test_max_model_len_caps_unbounded_requests(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler(max_model_len=12)
    sched.add_request(make_request("r", 5, max_tokens=None))
    outputs = helpers.complete(sched, fake_runner(4))
    assert len(outputs["r"]) == 7


def test_logprobs_are_passed_through(make_scheduler, make_request, fake_runner, helpers):
    sched = make_scheduler()
    sched.add_request(make_request("r", 5, max_tokens=2, logprobs=1))
    _, results = helpers.step(sched, fake_runner(4))
    assert results[0].new_logprobs[0].token_ids == results[0].new_token_ids
