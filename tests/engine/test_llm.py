"""The offline LLM API on the embedded default model: prompt forms, stopping, n, seeds, logprobs, errors."""

import pytest

from omnistream import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", num_kv_blocks=256)


def test_prompt_forms_give_the_same_result_in_input_order(llm):
    ids = llm.get_tokenizer().encode("The capital of France is")
    outs = llm.generate(
        ["The capital of France is", {"prompt": "The capital of France is"}, {"prompt_token_ids": ids}, "Hi"],
        GREEDY,
        use_tqdm=False,
    )
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    assert outs[0].prompt_token_ids == ids
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert len(outs[0].outputs[0].token_ids) == 12 and outs[0].outputs[0].finish_reason == "length"
    assert outs[3].prompt_token_ids != ids
    text = llm.get_tokenizer().decode(outs[0].outputs[0].token_ids)
    assert outs[0].outputs[0].text == text


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "Hello"}], GREEDY, use_tqdm=False)[0]
    rendered = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert out.prompt_token_ids == llm.get_tokenizer().encode(rendered)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate("Once upon a time", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = base[3]
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    first = base.index(stop_at)
    assert out.token_ids == base[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    blocked = llm.generate(
        "Once upon a time",
        SamplingParams(temperature=0.0, max_tokens=12, min_tokens=6, stop_token_ids=[base[0]]),
        use_tqdm=False,
    )[0].outputs[0]
    assert base[0] not in blocked.token_ids[:6] and len(blocked.token_ids) >= 6


def test_stop_strings_truncate_the_text(llm):
    base = llm.generate("Once upon a time", GREEDY, use_tqdm=False)[0].outputs[0]
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 2]
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.index(stop)]
    kept = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12, stop=[stop],
                                                          include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == base.text[: base.text.index(stop) + len(stop)]
    assert not llm.engine.has_unfinished_requests()


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_samples(llm):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=1234, ignore_eos=True)
    a = llm.generate(["x", "Tell me a story"], params, use_tqdm=False)[1].outputs[0].token_ids
    b = llm.generate("Tell me a story", params, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b
    many = llm.generate("Tell me a story", SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=9), use_tqdm=False)
    assert [o.index for o in many[0].outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in many[0].outputs}) == 3


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate("Hello world", SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, prompt_logprobs=2),
                       use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 5
    for token, position in zip(comp.token_ids, comp.logprobs):
        assert position[token].rank == 1  # greedy picks the most likely token
        assert 3 <= len(position) <= 4
    assert comp.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(comp.token_ids, comp.logprobs)))
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) and out.prompt_logprobs[0] is None
    for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in position and position[token].rank >= 1


def test_bad_requests_raise_clear_errors_and_leave_nothing_behind(llm):
    with pytest.raises(ValueError):
        llm.generate({"prompt_token_ids": []}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate({"nothing": 1}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate(["ok", {"prompt_token_ids": list(range(10)) * 1000}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    outside = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[llm.engine.model_config.text.vocab_size])
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate(["ok", "not ok"], [GREEDY, outside], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("still works", GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"
