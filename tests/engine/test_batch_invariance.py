"""Greedy outputs, and seeded samples with penalties, must not depend on batching, chunked prefill, prefix-cache
hits or preemption."""

import random

from omnistream import LLM, SamplingParams


def _prompts(seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(151643) for _ in range(40)]
    prompts = []
    for i in range(32):
        own = [rng.randrange(151643) for _ in range(rng.randint(3, 90))]
        prompts.append(shared + own if i % 3 == 0 else own)  # every third shares a 40-token prefix
    return prompts


def test_greedy_alone_equals_batched_with_chunking_prefix_hits_and_preemption():
    prompts = _prompts()
    params = [SamplingParams(temperature=0.0, max_tokens=8 + i % 9, ignore_eos=True) for i in range(len(prompts))]
    alone_llm = LLM(dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    alone = [
        alone_llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0].token_ids
        for p, sp in zip(prompts, params)
    ]
    # 24 blocks of 16 tokens cannot hold 32 running requests: preemption is forced.
    batched_llm = LLM(dtype="float32", num_kv_blocks=24, max_num_batched_tokens=64, enable_prefix_caching=True)
    outs = batched_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    stats = batched_llm.engine.scheduler.make_stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_hits > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert batched_llm.engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == 24


def test_seeded_samples_with_penalties_alone_equal_batched_with_preemption():
    prompts = _prompts(seed=11)[:12]
    # seeded draws in even rows; the tiny model's distributions are nearly flat, so penalties show in the greedy
    # odd rows (which repeat tokens): rows 5 and 11 are preempted after sampling, and resume with counts rebuilt
    params = [
        SamplingParams(temperature=0.9, top_p=0.9 if i % 4 == 2 else 1.0, top_k=50 if i % 3 == 0 else 0,
                       seed=100 + i, repetition_penalty=1.3, max_tokens=10 + i % 5, ignore_eos=True)
        if i % 2 == 0 else
        SamplingParams(temperature=0.0, presence_penalty=0.4 if i % 4 == 1 else 0.0,
                       frequency_penalty=0.5 if i % 4 == 3 else 0.0, max_tokens=10 + i % 5, ignore_eos=True)
        for i in range(len(prompts))
    ]
    alone_llm = LLM(dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    alone = [
        alone_llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0].token_ids
        for p, sp in zip(prompts, params)
    ]
    batched_llm = LLM(dtype="float32", num_kv_blocks=12, max_num_batched_tokens=48, enable_prefix_caching=True)
    outs = batched_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert batched_llm.engine.scheduler.make_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert len({tuple(tokens) for tokens in alone}) == len(alone)
