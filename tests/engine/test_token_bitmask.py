"""The grammar bitmask's fast paths against slow twins written bit by bit: unpacking (numpy on the host, a gather
of words on any device), masking logits, and the greedy correction that recomputes only the rows whose greedy
token the grammar forbids (one allowed token: that one; a few: their weight rows; many: full logits)."""

import numpy as np
import pytest
import torch

from omnistream.engine.model_executor.layers.embedding import ParallelLMHead
from omnistream.engine.worker import token_bitmask
from omnistream.engine.worker.token_bitmask import (
    StepBitmask,
    apply_token_bitmask,
    is_allowed,
    unpack_allowed,
    unpack_on_device,
    unpack_on_host,
)
from omnistream.scheduler.outputs import SchedulerOutput


def _allowed_twin(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [R, vocab], one bit at a time: token t is allowed when bit t % 32 of word t // 32 is set."""
    allowed = torch.zeros(words.shape[0], vocab, dtype=torch.bool)
    for i, row in enumerate(words.tolist()):
        for t in range(min(vocab, 32 * len(row))):
            allowed[i, t] = (row[t // 32] >> (t % 32)) & 1 == 1
    return allowed


def _words(rows: int, num_words: int, seed: int, kinds: tuple[str, ...] = ("random",)) -> torch.Tensor:
    """Masks of several shapes: random bits, all allowed but a few, a few allowed, one allowed, nothing allowed."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31 - 1, (rows, num_words), dtype=torch.int32, generator=gen)
    for i in range(rows):
        kind = kinds[i % len(kinds)]
        if kind == "many":
            words[i] = -1
            words[i, torch.randint(num_words, (3,), generator=gen)] = 0x0F0F0F0F
        elif kind == "few":
            words[i] = 0
            words[i, torch.randint(num_words, (2,), generator=gen)] = torch.randint(
                1, 2**31 - 1, (2,), generator=gen, dtype=torch.int32
            )
        elif kind == "one":
            words[i] = 0
            words[i, torch.randint(num_words, (1,), generator=gen)] = 1 << int(torch.randint(31, (1,), generator=gen))
        elif kind == "none":
            words[i] = 0
    return words


@pytest.mark.parametrize("vocab", [32 * 7, 32 * 7 - 5, 32 * 7 + 9])  # exact, padded bits, logits past the mask
def test_unpacking_matches_the_bit_by_bit_twin(vocab):
    words = _words(5, 7, seed=vocab, kinds=("random", "many", "few", "none"))
    want = _allowed_twin(words, vocab)
    assert torch.equal(unpack_allowed(words, vocab, "cpu"), want)
    covered = min(vocab, 7 * 32)
    assert torch.equal(unpack_on_host(words, covered), want[:, :covered])
    assert torch.equal(unpack_on_device(words, covered), want[:, :covered])
    token_ids = torch.tensor([0, 31, 32 * 7 - 1, 45, 32 * 7 + 3])  # the last one lies past every word
    wide = _allowed_twin(words, 32 * 8)
    want_ids = wide[torch.arange(5), token_ids]
    assert torch.equal(is_allowed(words, token_ids), want_ids) and not want_ids[4]


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [3, 0, 5], []])
def test_masking_logits_matches_a_masked_fill_of_the_twin(rows):
    vocab, num_words = 32 * 9 + 4, 9
    words = _words(len(rows), num_words, seed=len(rows), kinds=("random", "few", "many", "none"))
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6 if rows != [0, 1, 2, 3] else 4, vocab, generator=gen)
    want = logits.clone()
    allowed = _allowed_twin(words, vocab)
    for i, row in enumerate(rows):
        want[row] = want[row].masked_fill(~allowed[i], float("-inf"))
    apply_token_bitmask(logits, words, rows)
    assert torch.equal(logits, want)


def _head(vocab: int, hidden: int, seed: int) -> ParallelLMHead:
    head = ParallelLMHead(vocab, hidden)
    head.weight.copy_(torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed)))
    return head


@pytest.mark.parametrize("fraction", [0.0, 0.01, 1.0])  # rejected rows get full logits / either / a projection
@pytest.mark.parametrize("seed", range(3))
def test_the_greedy_correction_equals_masked_logits_then_first_maximum(seed, fraction, monkeypatch):
    monkeypatch.setattr(token_bitmask, "PROJECTED_FRACTION", fraction)
    batch, hidden_size, vocab = 24, 16, 32 * 300 - 7  # the last word of each mask has padding bits
    head = _head(vocab, hidden_size, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    hidden = torch.randn(batch, hidden_size, generator=gen)
    rows = [r for r in range(batch) if r % 5 != 2]  # some rows sample without a grammar
    words = _words(len(rows), 300, seed, kinds=("few", "many", "random", "one", "few", "none"))
    words[-4:] = words[4:8]  # rows at the same grammar state share one projection
    logits = head(hidden).float()
    greedy = logits.max(dim=-1).indices
    for i, row in enumerate(rows[:3]):  # rows whose greedy token their grammar allows keep it
        words[i, greedy[row] // 32] |= 1 << int(greedy[row] % 32)
    want = logits.clone()
    apply_token_bitmask(want, words, rows)
    want = want.max(dim=-1).indices
    mask = StepBitmask(rows, words)
    got = mask.correct_greedy(greedy.clone(), hidden, head, lambda h: head(h).float())
    assert torch.equal(got, want)
    assert (got != greedy).sum() >= len(rows) // 2  # most rows were corrected: the test compares real work


def test_the_step_bitmask_reads_the_rows_of_the_scheduler_output():
    words = _words(2, 3, seed=0)
    so = SchedulerOutput(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=[],
        num_scheduled_tokens={},
        total_num_scheduled_tokens=0,
        preempted_req_ids=[],
        finished_req_ids=[],
        grammar_req_ids=["c", "a"],
        grammar_bitmask=words.numpy().astype("<i4").tobytes(),
    )
    mask = StepBitmask.from_scheduler_output(so, ["a", "b", "c"])
    assert mask.rows == [2, 0] and torch.equal(mask.words, words)
    so.grammar_req_ids = []
    assert StepBitmask.from_scheduler_output(so, ["a"]) is None
    assert np.array_equal(_allowed_twin(words, 96).numpy(), unpack_allowed(words, 96, "cpu").numpy())


@pytest.mark.parametrize("vocab", [32 * 7, 32 * 7 - 5, 32 * 9 + 3])  # as wide as the words, narrower, wider
def test_row_words_lay_the_masks_out_for_the_greedy_head(vocab):
    words = _words(3, 7, seed=vocab, kinds=("random", "few", "none"))
    dense = StepBitmask([4, 0, 2], words).row_words(6, vocab)
    width = -(-vocab // 32)
    assert dense.shape == (6, width) and dense.dtype == torch.int32
    allowed = _allowed_twin(dense, vocab)
    want = _allowed_twin(words, vocab)  # past the words: forbidden
    assert torch.equal(allowed[[4, 0, 2]], want)
    assert allowed[[1, 3, 5]].all()  # rows without a grammar allow every token


@pytest.mark.parametrize("vocab", [32 * 7, 32 * 7 - 5])  # words exactly as wide as the vocabulary needs
def test_row_words_of_a_batch_all_constrained_in_order_are_the_words_themselves(vocab):
    words = _words(3, 7, seed=vocab, kinds=("random", "few", "none"))
    dense = StepBitmask([0, 1, 2], words).row_words(3, vocab)
    assert dense.data_ptr() == words.data_ptr()  # no copy
    laid_out = StepBitmask([0, 1, 2], words).row_words(4, vocab)[:3]  # a fourth row: the copying layout
    assert torch.equal(_allowed_twin(dense, vocab), _allowed_twin(laid_out, vocab))


def test_allowed_among_checks_each_kept_id_like_the_twin():
    words = _words(5, 7, seed=9, kinds=("random", "few", "one", "none", "many"))
    ids = torch.randint(0, 7 * 32 + 10, (5, 12), generator=torch.Generator().manual_seed(10))
    ids[:, 0] = -1  # an empty slot of the kernel's top-k
    got = token_bitmask.allowed_among(words.numpy(), ids.numpy())
    allowed = _allowed_twin(words, 7 * 32)
    want = [[0 <= t < 7 * 32 and bool(allowed[i, t]) for t in row] for i, row in enumerate(ids.tolist())]
    assert got.tolist() == want and got.any()
