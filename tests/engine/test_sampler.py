"""The sampler on hand-made logits: the vectorized pass equals a slow per-row twin on random mixed batches,
draws follow softmax(logits / T) (within a chi-square bound), a seeded row draws the same token in any batch,
logprobs are those of the raw logits, penalties count what was sampled, min_tokens and stop ids block, and the
pass creates no host tensor (run on the meta device under a tripwire)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from omnistream.engine.model_executor.layers.embedding import ParallelLMHead
from omnistream.engine.worker import greedy_head
from omnistream.engine.worker.sampler import sample, to_host
from omnistream.engine.worker.sampling_draws import block_size
from omnistream.engine.worker.sampling_state import SamplingState
from omnistream.scheduler.sampling_params import SamplingParams
from tests.engine.sampler_twin import TwinRow, twin_sample

EOS = [2, 7]
CPU = torch.device("cpu")


def _sample(logits, rows, seed=0):
    """Sample one step of rows (TwinRow: params, prompt, output) through SamplingState and the device pass."""
    state = SamplingState(logits.shape[1], EOS, seed, CPU)
    for i, row in enumerate(rows):
        state.set_request(f"r{i}", row.params, row.prompt + row.output, len(row.prompt))
    meta = state.prepare([f"r{i}" for i in range(len(rows))], [len(row.output) for row in rows])
    return to_host(sample(logits.clone(), meta), meta)


def _row(params, prompt=(), output=()):
    return TwinRow(params, list(prompt), list(output))


def _random_params(rng: random.Random, vocab: int) -> SamplingParams:
    kind = rng.choice(["greedy", "seeded", "unseeded"])
    return SamplingParams(
        temperature=0.0 if kind == "greedy" else rng.choice([0.5, 1.0, 1.7]),
        seed=rng.randrange(-2**70, 2**70) if kind == "seeded" else None,
        top_k=rng.choice([0, 0, 1, 5, 40, vocab + 3]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.3]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        presence_penalty=rng.choice([0.0, 0.0, 0.8, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.4]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        min_tokens=rng.choice([0, 0, 3]),
        max_tokens=10,
        stop_token_ids=rng.choice([[], [11], [11, 12, 13]]),
        ignore_eos=rng.random() < 0.2,
        logprobs=rng.choice([None, None, 0, 3]),
    )


@pytest.mark.parametrize("case", range(6))
def test_the_vectorized_pass_equals_the_per_row_twin_on_random_mixed_batches(case):
    rng = random.Random(case)
    vocab = [1000, 1531, 64][case % 3]  # blocks of 32 (the last one short), 32 (short), 8 (exact)
    rows = []
    for _ in range(rng.randint(1, 24)):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        rows.append(_row(_random_params(rng, vocab), prompt, output))
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(case))
    logits[:, EOS[0]] += 4.0  # eos is often the best token: min_tokens matters
    tokens, logprobs = _sample(logits, rows, seed=case)
    want_tokens, want_logprobs = twin_sample(logits, rows, EOS, engine_seed=case)
    assert tokens == want_tokens
    for got, want in zip(logprobs, want_logprobs):
        assert (got is None) == (want is None)
        if want is not None:
            assert got.token_ids == want.token_ids and got.ranks == want.ranks
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-6)


@pytest.mark.parametrize("vocab,params", [
    (8, SamplingParams(temperature=0.7)),
    (50, SamplingParams(temperature=1.3)),  # blocks of 8 and a short last one
    (50, SamplingParams(temperature=1.0, top_k=20, top_p=0.8)),
])
def test_sampled_frequencies_follow_softmax_of_logits_over_temperature(vocab, params):
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(vocab)) * 1.5
    probs = (logits[0] / params.temperature).softmax(0)
    if params.top_k:  # the allowed set, renormalised
        ordered, order = probs.sort(descending=True)
        ordered[params.top_k:] = 0
        ordered = ordered / ordered.sum()
        keep = (ordered.cumsum(0) - ordered) < params.top_p
        probs = torch.zeros_like(probs).index_put_((order,), ordered * keep)
        probs = probs / probs.sum()
    draws = 20000
    tokens, _ = _sample(logits.expand(draws, -1), [_row(params)] * draws)  # one step, the engine stream
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    assert counts[probs == 0].sum() == 0
    support = probs > 0
    expected = probs[support].double() * draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 4.5 * math.sqrt(2 * dof)  # about p < 1e-4 for these degrees of freedom


def test_a_seeded_row_draws_the_same_token_whatever_else_is_in_the_batch():
    vocab = 3000
    gen = torch.Generator().manual_seed(0)
    mine = _row(SamplingParams(temperature=1.0, top_p=0.95, seed=1234), prompt=[1, 2, 3], output=[5] * 4)
    row_logits = torch.randn(1, vocab, generator=gen)
    picks = set()
    for size in (1, 3, 17):
        others = [_row(SamplingParams(temperature=t, top_k=k, repetition_penalty=1.2, seed=s), [4], [9])
                  for t, k, s in [(0.0, 0, None), (1.0, 5, None), (0.8, 0, 7)] * 6][: size - 1]
        for position in {0, size - 1, size // 2}:
            rows = others[:position] + [mine] + others[position:]
            logits = torch.randn(size, vocab, generator=gen)
            logits[position] = row_logits[0]
            picks.add(_sample(logits, rows, seed=size)[0][position])
    assert len(picks) == 1
    # the draw moves with the output position (and so across a request's steps)
    later = _row(mine.params, mine.prompt, mine.output + [6])
    assert {_sample(row_logits, [later])[0][0] for _ in range(2)} != picks


def test_unseeded_rows_take_new_numbers_of_the_engine_stream_each_step():
    state = SamplingState(500, EOS, 0, CPU)
    names = [f"r{i}" for i in range(4)]
    for name in names:
        state.set_request(name, SamplingParams(temperature=1.0), [1], 1)
    tokens = []
    for _ in range(3):  # same logits, same output positions: only the stream moves
        meta = state.prepare(names, [0] * 4)
        tokens += to_host(sample(torch.zeros(4, 500), meta), meta)[0]
    assert len(set(tokens)) >= 10  # 12 draws, uniform over 500 tokens
    again = SamplingState(500, EOS, 0, CPU)
    for name in names:
        again.set_request(name, SamplingParams(temperature=1.0), [1], 1)
    meta = again.prepare(names, [0] * 4)
    assert to_host(sample(torch.zeros(4, 500), meta), meta)[0] == tokens[:4]  # the engine seed fixes the stream


def test_greedy_takes_the_first_of_equal_maxima():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert _sample(logits, [_row(SamplingParams(temperature=0))] * 2)[0] == [1, 0]


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.5, 0.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 7.0, 3.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[11])
    assert _sample(logits, [_row(params, output=[4])])[0] == [12]  # 2 and 7 are eos, 11 a stop id
    assert _sample(logits, [_row(params, output=[4, 4])])[0] == [2]
    ignoring = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[11], ignore_eos=True)
    assert _sample(logits, [_row(ignoring, output=[4])])[0] == [2]
    sampled = SamplingParams(temperature=1.0, min_tokens=5, seed=3, stop_token_ids=[11])
    picks = {_sample(logits * 10, [_row(sampled, output=[4] * n)])[0][0] for n in range(5)}
    assert picks == {12}  # the random path is blocked as well


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    # token 0 seen in the prompt: 2.0 / 2 = 1.0 < 1.9
    assert _sample(torch.tensor([[2.0, -1.0, 1.9]]), [_row(params, prompt=[0])])[0] == [2]
    # token 0 seen in the output: -0.5 * 2 = -1.0 < -0.9
    assert _sample(torch.tensor([[-0.5, -1.0, -0.9]]), [_row(params, output=[0])])[0] == [2]


def test_frequency_and_presence_penalties_apply_to_output_tokens_only():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    freq = SamplingParams(temperature=0, frequency_penalty=0.6)
    assert _sample(logits, [_row(freq, prompt=[0, 0, 0])])[0] == [0]  # prompt tokens don't count
    assert _sample(logits, [_row(freq, output=[0, 0])])[0] == [1]  # 5 - 2*0.6 = 3.8 < 4
    pres = SamplingParams(temperature=0, presence_penalty=1.5)
    assert _sample(logits, [_row(pres, output=[0, 0, 0])])[0] == [1]  # 5 - 1.5 = 3.5


def test_penalty_counts_follow_the_sampled_tokens_and_turn_boundaries():
    state = SamplingState(6, EOS, 0, CPU)
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    state.set_request("a", params, [3, 3, 1], 2)
    state.set_request("b", SamplingParams(temperature=0), [4], 1)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 2.5]]).expand(2, -1)
    for step, want in enumerate([5, 5, 5, 0]):  # 5 loses 1.0 each time: 2.5, 1.5, 0.5, then -0.5 < 0
        meta = state.prepare(["a", "b"], [1 + step, step])
        out = sample(logits.clone(), meta)
        state.record(meta, out.token_ids)
        assert to_host(out, meta)[0] == [want, 5]
    assert state.penalties.counts.sum(dim=0).tolist() == [1, 1, 0, 0, 0, 3]  # "a"'s outputs, counted there
    state.set_request("a", params, [3, 3, 1, 5, 5, 5], 6)  # the next turn: everything so far is prompt
    meta = state.prepare(["a"], [0])
    assert to_host(sample(logits[:1].clone(), meta), meta)[0] == [5]
    state.remove("a")
    assert state.penalties.counts.shape[0] == 0  # no penalized request left: the tables are gone
    state.remove("b")


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(300, -1)
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.4), {0}),
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.83), {0, 1}),  # top-p of the top-3 renormalised
        (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),
    ]:
        assert set(_sample(logits, [_row(params)] * 300)[0]) == allowed, params


def test_logprobs_and_ranks_are_those_of_the_raw_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.1, 0.2, 0.3]])
    penalized = SamplingParams(temperature=0, logprobs=2, repetition_penalty=5.0)
    tokens, logprobs = _sample(logits, [_row(penalized, prompt=[1]), _row(SamplingParams(temperature=0))])
    raw = torch.log_softmax(logits[0], 0)
    assert tokens == [2, 0] and logprobs[1] is None  # the penalty moved row 0's choice away from token 1
    entry = logprobs[0]
    assert entry.token_ids == [2, 1, 2] and entry.ranks == [2, 1, 2]
    assert entry.logprobs == pytest.approx([float(raw[2]), float(raw[1]), float(raw[2])], abs=1e-6)


def test_tokens_a_grammar_forbids_stay_forbidden_through_penalties_and_filters():
    logits = torch.tensor([[9.0, 1.0, 2.0, -1.0, float("-inf"), float("-inf")]]).expand(40, -1)
    logits = logits.masked_fill(torch.tensor([True, False, True, False, False, False]), float("-inf"))
    rows = [_row(SamplingParams(temperature=0.0 if i % 2 else 1.5, seed=i, top_p=0.99 if i % 4 == 1 else 1.0,
                                top_k=3 if i % 4 == 2 else 0, repetition_penalty=0.5, frequency_penalty=-2.0,
                                presence_penalty=-2.0), prompt=[0, 2, 4], output=[0, 5, 5])
            for i in range(40)]
    assert set(_sample(logits, rows)[0]) == {1, 3}


def test_any_python_int_is_a_seed():
    logits = torch.randn(1, 700, generator=torch.Generator().manual_seed(1))
    picks = [_sample(logits, [_row(SamplingParams(temperature=1.0, seed=seed))])[0][0]
             for seed in (-1, 2**64 - 1, 5, 5 + 2**64, 2**200 + 3)]
    assert picks[0] == picks[1] and picks[2] == picks[3]  # seeds are taken modulo 2**64


@pytest.mark.parametrize("num_rows", [1, 7, 100])
def test_the_chunked_greedy_lm_head_picks_the_first_maximum_of_the_full_logits(monkeypatch, num_rows):
    monkeypatch.setattr(greedy_head, "CHUNK_ELEMENTS", 5000)  # 50 to 5000 columns a chunk: many chunks
    lm_head = ParallelLMHead(6007, 16)
    lm_head.weight.normal_(generator=torch.Generator().manual_seed(num_rows))
    hidden = torch.randn(num_rows, 16, generator=torch.Generator().manual_seed(0))
    hidden[0] = 0.0  # every logit 0: the first id wins
    lm_head.weight[5999] = lm_head.weight[3] = 50.0 * hidden[-1]  # a tie far apart: the earlier chunk wins
    want = lm_head(hidden).max(dim=-1).indices
    assert want[0] == 0 and (num_rows == 1 or want[-1] == 3)
    assert torch.equal(greedy_head.greedy_tokens(lm_head, hidden), want)


class _NoHostTensors(TorchDispatchMode):
    """Fails on any op that produces a CPU tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":
                raise AssertionError(f"{func} made a host tensor")
        return out


def test_the_sampling_pass_creates_no_host_tensor_and_needs_no_data():
    meta_device = torch.device("meta")
    vocab = 5000
    state = SamplingState(vocab, EOS, 0, meta_device)
    rng = random.Random(3)
    rows = [_random_params(rng, vocab) for _ in range(20)]
    rows += [SamplingParams(temperature=1.0, top_p=0.5, frequency_penalty=0.3, min_tokens=4, logprobs=2)]
    for i, params in enumerate(rows):
        state.set_request(f"r{i}", params, [1, 2, 3, 4], 3)
    meta = state.prepare([f"r{i}" for i in range(len(rows))], [1] * len(rows))
    assert meta.random is not None and len(meta.random.filters) == 2 and meta.penalties and meta.blocked
    logits = torch.empty(len(rows), vocab, device=meta_device)
    with _NoHostTensors():
        out = sample(logits, meta)
        state.record(meta, out.token_ids)
    assert out.token_ids.shape == (len(rows),) and out.logprobs is not None


def test_the_tripwire_catches_a_host_tensor():
    with pytest.raises(AssertionError, match="host tensor"), _NoHostTensors():
        torch.zeros(3)


def test_the_race_uses_blocks_of_about_the_square_root_of_the_vocabulary():
    assert block_size(152064) == 512 and block_size(64) == 8 and block_size(1) == 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0), dict(min_tokens=5, max_tokens=2),
     dict(n=0), dict(logprobs=-1), dict(stop=[""]), dict(repetition_penalty=0), dict(stop_token_ids=[5, -1])],
)
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_stop_token_ids_outside_the_vocabulary_name_the_field():
    params = SamplingParams(stop_token_ids=[3, 99])
    params.check_vocab(100)
    with pytest.raises(ValueError, match=r"stop_token_ids: token id 99 is outside the vocabulary \(0..98\)"):
        params.check_vocab(99)
