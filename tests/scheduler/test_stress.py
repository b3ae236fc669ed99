"""Randomized, seeded stress on a tiny pool: invariants every step, every block back at the end,
and the same outputs as an unconstrained run."""

import random

import pytest

from omnistream.scheduler.request import RequestStatus


@pytest.mark.parametrize("seed", range(6))
def test_random_workload(seed, make_scheduler, make_request, fake_runner, helpers):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 8])
    tight = dict(
        block_size=block_size,
        max_model_len=64,
        num_kv_blocks=rng.randint(64 // block_size, 96 // block_size),
        max_num_batched_tokens=rng.choice([8, 16, 33]),
        max_num_seqs=rng.choice([2, 5, 16]),
        long_prefill_token_threshold=rng.choice([0, 0, 5]),
        enable_prefix_caching=rng.random() < 0.7,
    )
    prefixes = [[rng.randrange(100, 900) for _ in range(rng.randint(0, 24))] for _ in range(3)]
    specs = []
    for i in range(40):
        prompt = (rng.choice(prefixes) + [rng.randrange(100, 900) for _ in range(rng.randint(1, 20))])[:40]
        max_tokens = rng.choice([None, 1, 3, 10, 30])
        params = dict(max_tokens=max_tokens and min(max_tokens, 64 - len(prompt)), ignore_eos=True)
        if rng.random() < 0.15:
            params["prompt_logprobs"] = 0
        specs.append((f"r{i}", prompt, params, rng.randrange(0, 8)))  # arrival step

    def run(config, aborts):
        sched = make_scheduler(**config)
        runner = fake_runner(block_size)
        outputs: dict[str, list[int]] = {}
        step = 0
        while step < 5000 and (sched.has_unfinished_requests() or step < 8):
            for req_id, prompt, params, arrival in specs:
                if arrival == step:
                    sched.add_request(make_request(req_id, prompt, **params))
            if step in aborts:
                sched.finish_requests(aborts[step], RequestStatus.FINISHED_ABORTED)
            plan, _ = helpers.step(sched, runner, outputs)
            if sched.has_unfinished_requests():
                assert plan.total_num_scheduled_tokens > 0, "a step with work must make progress"
            step += 1
        assert not sched.has_unfinished_requests()
        sched.schedule()
        assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == config["num_kv_blocks"]
        return outputs, sched.make_stats()

    roomy = dict(tight, num_kv_blocks=4096 // block_size, max_num_batched_tokens=4096, max_num_seqs=64)
    expected, _ = run(roomy, {})
    got, stats = run(tight, {})
    assert got == expected
    for req_id, prompt, params, _ in specs:
        assert len(got[req_id]) == min(params["max_tokens"] or 64, 64 - len(prompt))
    assert stats.num_preemptions > 0  # the tight pool really was tight
    aborts = {rng.randrange(1, 30): [rng.choice(specs)[0] for _ in range(3)] for _ in range(5)}
    run(tight, aborts)  # aborted mid-flight, waiting or already done: still every block comes back

