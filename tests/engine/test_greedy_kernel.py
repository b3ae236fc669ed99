"""The compiled greedy lm_head picks what its torch twin (greedy_head.chunked_max) and `logits.max(-1)` pick: the
first maximum, in float32 and bfloat16, for any number of rows, vocabularies that are not a multiple of its tile,
hidden sizes that are not a multiple of its vectors, vocabulary shards (views with a row stride), and any number of
threads; without the kernel (OMNISTREAM_GREEDY_KERNEL=0) the torch path answers the same. Given masks of allowed
tokens, the kernel answers as its twin (full logits, -inf where forbidden, first maximum) for dense, sparse,
single-token, whole-tile and empty masks. Its top-k (greedy_top) is the kernel's own logits in the order (value
descending, id ascending), whatever the threads, with ties and NaNs; rows recomputed apart `as_batch_of` their batch
get bit for bit the values they had in it, masked or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.layers.embedding import ParallelLMHead
from omnistream.engine.worker import greedy_head, greedy_kernel
from omnistream.engine.worker.token_bitmask import StepBitmask

pytestmark = pytest.mark.skipif(greedy_kernel.load_kernel() is None, reason="no C compiler: the kernel is not built")

VOCAB, HIDDEN = 1037, 40  # 16 tiles of 64 rows and 13 more; 40 = 2 vectors of 16 and 8 more


def _weight(dtype: torch.dtype, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(vocab, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _hidden(rows: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _clear_winners(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Rows whose best logit (in float64) leads the runner-up by more than any summation order can move it."""
    top2 = F.linear(hidden.double(), weight.double()).topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]) > 1e-3 * top2[:, 0].abs().clamp(min=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 15, 16, 17, 33, 48, 64, 65, 300])
def test_kernel_twin_and_full_logits_pick_the_same_ids(dtype, rows):
    weight, hidden = _weight(dtype, rows), _hidden(rows, dtype)
    values, ids = greedy_kernel.greedy_max(weight, hidden)
    twin_values, twin_ids = greedy_head.chunked_max(weight, hidden)
    logits = F.linear(hidden, weight)
    full = logits.max(dim=-1)
    clear = _clear_winners(weight, hidden)
    assert clear.float().mean() > 0.8  # the check below covers most rows
    assert torch.equal(ids[clear], full.indices[clear]) and torch.equal(ids[clear], twin_ids[clear])
    # every row: the chosen id's logit is the maximum, up to the rounding of the sum's order
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    chosen = logits.float().gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, full.values.float(), atol=tolerance, rtol=tolerance)
    assert values.dtype == dtype
    torch.testing.assert_close(values.float(), twin_values.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("rows", [3, 7, 8, 40, 70])
def test_ties_keep_the_first_maximum_whatever_the_threads(monkeypatch, dtype, threads, rows):
    monkeypatch.setattr(greedy_kernel.torch, "get_num_threads", lambda: threads)
    weight, hidden = _weight(torch.float32, 7), _hidden(rows, torch.float32, 8)
    hidden[0] = 0.0  # every logit 0: id 0 wins
    weight[1030] = weight[700] = weight[5] = 40.0 * hidden[-1]  # a tie across tiles and thread ranges: 5 wins
    weight[900] = weight[600] = 40.0 * hidden[1]  # row 1: 600 wins
    weight, hidden = weight.to(dtype), hidden.to(dtype)
    _, ids = greedy_kernel.greedy_max(weight, hidden)
    want = F.linear(hidden, weight).max(dim=-1).indices
    assert ids[0] == 0 and ids[1] == 600 and ids[-1] == 5
    assert torch.equal(ids[[0, 1, -1]], want[[0, 1, -1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_count_from_1_to_70_on_random_shapes_keeps_the_first_of_planted_ties(dtype):
    gen = torch.Generator().manual_seed(17 + dtype.itemsize)
    checked = 0
    for rows in range(1, 71):
        vocab, hidden_size = (
            int(torch.randint(2, 400, (1,), generator=gen)),
            int(torch.randint(1, 80, (1,), generator=gen)),
        )
        weight = torch.randn(vocab, hidden_size, generator=gen)
        hidden = torch.randn(rows, hidden_size, generator=gen)
        tied = torch.randperm(rows, generator=gen)[: max(1, rows // 4)].tolist()
        first = {}
        for b in tied:  # two ids share row b's dominant logit: the lower one must win
            i, j = sorted(torch.randperm(vocab, generator=gen)[:2].tolist())
            weight[i] = weight[j] = 40.0 * hidden[b]
            first[b] = i
        weight, hidden = weight.to(dtype), hidden.to(dtype)
        _, ids = greedy_kernel.greedy_max(weight, hidden)
        _, twin_ids = greedy_head.chunked_max(weight, hidden)
        clear = _clear_winners(weight, hidden)
        assert torch.equal(ids[clear], twin_ids[clear]), f"{rows} rows, vocabulary {vocab}, hidden {hidden_size}"
        planted = F.linear(hidden, weight).max(dim=-1).indices
        for b, i in first.items():
            if planted[b] == i:  # the planted pair is row b's maximum (not beaten by another row's pair)
                assert ids[b] == i == twin_ids[b], f"row {b} of {rows}: {ids[b]} instead of {i}"
                checked += 1
    assert checked > 300  # most planted ties were their row's maximum


# ties across the rows-in-lanes loop's steps of 8 ids, its tiles of 64 (whose successors it prefetches), the thread
# ranges, and the last, partial tile (VOCAB = 1037)
BOUNDARY_TIES = [(7, 8), (15, 16), (63, 64), (127, 128), (191, 200), (1023, 1024), (1030, 1036)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [8, 9, 19, 24, 33, 40, 47])  # rows in lanes, not whole vectors of 16
def test_rows_in_lanes_keep_the_first_of_ties_across_its_blocks_and_never_pick_nan(monkeypatch, dtype, threads, rows):
    monkeypatch.setattr(greedy_kernel.torch, "get_num_threads", lambda: threads)
    weight, hidden = _weight(torch.float32, 80 + rows), _hidden(rows, torch.float32, 81 + rows)
    planted = dict(zip(range(rows), BOUNDARY_TIES, strict=False))
    for b, (i, j) in planted.items():
        weight[i] = weight[j] = 40.0 * hidden[b]
    weight[9] = weight[500] = float("nan")  # in the step after the first tie's; in the middle of a tile
    weight, hidden = weight.to(dtype), hidden.to(dtype)
    values, ids = greedy_kernel.greedy_max(weight, hidden)
    logits = F.linear(hidden, weight).float().nan_to_num(nan=-float("inf"))
    want = logits.max(dim=-1).indices
    assert not ((ids == 9) | (ids == 500)).any()
    for b, (i, _) in planted.items():
        assert want[b] == i and ids[b] == i, f"row {b}: {ids[b]} instead of {i}"
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # every row: the chosen logit is the maximum
    chosen = logits.gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(chosen, logits.max(dim=-1).values, atol=tolerance, rtol=tolerance)
    top_values, top_ids = greedy_kernel.greedy_top(weight, hidden, 2)  # the same logits through the top-k lists
    assert torch.equal(top_ids[:, 0], ids) and torch.equal(top_values[:, 0], values.float())


@pytest.mark.parametrize("rows", [8, 19, 47])
def test_rows_in_lanes_compare_bf16_logits_rounded_so_the_first_of_a_rounded_tie_wins(rows):
    weight, hidden = _weight(torch.bfloat16, 90 + rows), _hidden(rows, torch.bfloat16, 91 + rows)
    b, first, later = rows - 1, 63, 64  # the later id in the next tile, larger before rounding
    weight[first] = (40.0 * hidden[b].float()).bfloat16()

    def rounded_tie(h: int) -> bool:
        """Whether weight[later, h] nudged away from zero (as hidden[b, h] is 40 times) makes a larger logit (by far more
        than fp32 sums differ) that rounds (with a margin) to the same bf16 logit as weight[first]'s."""
        weight[later] = weight[first]
        weight[later, h] = (weight[later, h].float() * (1 + 2**-7)).bfloat16()  # one or two bf16 steps out
        exact = F.linear(hidden[b].double(), weight[[first, later]].double())
        ends = torch.stack([exact - 0.01, exact + 0.01]).float().bfloat16()
        return bool(exact[1] - exact[0] > 0.01) and bool((ends == ends[0, 0]).all())

    assert any(rounded_tie(h) for h in (hidden[b].float().abs() - 0.5).abs().argsort().tolist())
    assert greedy_kernel.greedy_max(weight, hidden)[1][b] == first


def test_every_logit_minus_infinity_gives_id_zero_as_argmax_does():
    weight = torch.zeros(VOCAB, HIDDEN)
    weight[:, 0] = -float("inf")
    hidden = torch.ones(20, HIDDEN)
    assert greedy_kernel.greedy_max(weight, hidden)[1].tolist() == [0] * 20
    assert F.linear(hidden, weight).max(dim=-1).indices.tolist() == [0] * 20


@pytest.mark.parametrize("rows", [1, 20])
def test_a_vocabulary_shard_with_a_row_stride_gives_ids_within_the_shard(rows):
    wide = torch.randn(VOCAB, HIDDEN + 24, generator=torch.Generator().manual_seed(3))
    weight = wide[:, :HIDDEN]  # rows HIDDEN + 24 elements apart
    hidden = _hidden(rows, torch.float32, 4)
    start, end = 300, 950  # one rank's shard
    _, ids = greedy_kernel.greedy_max(weight[start:end], hidden)
    want = F.linear(hidden, weight[start:end]).max(dim=-1).indices
    clear = _clear_winners(weight[start:end], hidden)
    assert clear.any() and torch.equal(ids[clear], want[clear])


def test_greedy_tokens_uses_the_kernel_and_greedy_pays_follows_the_measured_thresholds(monkeypatch):
    lm_head = ParallelLMHead(VOCAB, HIDDEN)
    lm_head.weight.normal_(generator=torch.Generator().manual_seed(5))
    hidden = _hidden(30, torch.float32, 6)
    calls = []
    monkeypatch.setattr(
        greedy_kernel, "greedy_max", lambda w, h: calls.append(h.shape[0]) or greedy_head.chunked_max(w, h)
    )
    greedy_head.greedy_tokens(lm_head, hidden)
    assert calls == [30]
    for dtype, from_rows in greedy_head.KERNEL_FROM_ROWS.items():
        lm_head = lm_head.to(dtype)
        assert greedy_head.greedy_pays(lm_head, 1) and greedy_head.greedy_pays(lm_head, from_rows)
        assert not greedy_head.greedy_pays(lm_head, from_rows - 1) or from_rows <= 2
    assert not greedy_head.greedy_pays(ParallelLMHead(VOCAB, HIDDEN).to("meta"), 256)  # a GPU keeps one GEMM


def test_without_the_kernel_the_torch_path_answers(monkeypatch):
    lm_head = ParallelLMHead(VOCAB, HIDDEN)
    lm_head.weight.normal_(generator=torch.Generator().manual_seed(9))
    hidden = _hidden(70, torch.float32, 10)
    with_kernel = greedy_head.greedy_tokens(lm_head, hidden)
    monkeypatch.setenv(greedy_kernel.DISABLE_ENV, "0")
    greedy_kernel.load_kernel.cache_clear()
    try:
        assert greedy_kernel.load_kernel() is None and not greedy_kernel.supports(lm_head.weight, torch.float32)
        assert not greedy_head.greedy_pays(lm_head, greedy_head.CHUNKED_FROM_ROWS - 1)
        assert greedy_head.greedy_pays(lm_head, greedy_head.CHUNKED_FROM_ROWS)
        without = greedy_head.greedy_tokens(lm_head, hidden)
    finally:
        monkeypatch.delenv(greedy_kernel.DISABLE_ENV)
        greedy_kernel.load_kernel.cache_clear()
    clear = _clear_winners(lm_head.weight, hidden)
    assert torch.equal(with_kernel[clear], without[clear])
    assert torch.equal(without, lm_head(hidden).max(dim=-1).indices)


def test_the_kernel_is_built_at_start_up_for_a_cpu_lm_head_only(monkeypatch):
    built = []
    monkeypatch.setattr(greedy_kernel, "load_kernel", lambda: built.append(True))
    greedy_head.prepare_greedy_head(ParallelLMHead(VOCAB, HIDDEN).to("meta"))
    assert built == []
    greedy_head.prepare_greedy_head(ParallelLMHead(VOCAB, HIDDEN))
    assert built == [True]


def _allowed_bits(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [R, vocab], one bit at a time: id t is allowed when bit t % 32 of word t // 32 is set."""
    allowed = torch.zeros(words.shape[0], vocab, dtype=torch.bool)
    for i, row in enumerate(words.tolist()):
        for t in range(vocab):
            allowed[i, t] = (row[t // 32] >> (t % 32)) & 1 == 1
    return allowed


def _masks(rows: int, vocab: int, seed: int, extra_words: int = 0) -> torch.Tensor:
    """int32 [rows, ceil(vocab / 32) + extra_words] of mixed kinds: dense, sparse, one id, every id, random, a few
    whole tiles; row 4 allows nothing, and every row forbids a run of tiles (ids 128 to 639)."""
    gen = torch.Generator().manual_seed(seed)
    width = -(-vocab // 32) + extra_words
    allowed = torch.zeros(rows, width * 32, dtype=torch.bool)
    for i in range(rows):
        kind = i % 6
        if kind == 0:
            allowed[i] = torch.rand(width * 32, generator=gen) < 0.9
        elif kind == 1:
            allowed[i] = torch.rand(width * 32, generator=gen) < 0.01
        elif kind == 2:
            allowed[i, int(torch.randint(vocab, (1,), generator=gen))] = True
        elif kind == 3:
            allowed[i] = True
        elif kind == 4 and i != 4:  # row 4 forbids every id
            allowed[i] = torch.rand(width * 32, generator=gen) < 0.5
        elif kind == 5:
            for tile in torch.randint(vocab // 64 + 1, (3,), generator=gen).tolist():
                allowed[i, 64 * tile : 64 * tile + 64] = True
    allowed[:, 128:640] = False
    return torch.from_numpy(np.packbits(allowed.numpy(), axis=1, bitorder="little").view("<i4").copy())


def _masked_twin(weight: torch.Tensor, hidden: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Full logits, -inf where the bit is 0, argmax (the first maximum)."""
    logits = F.linear(hidden, weight).float()
    return logits.masked_fill(~_allowed_bits(words, weight.shape[0]), float("-inf")).max(dim=-1).indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("rows", [1, 5, 8, 24, 64, 70])  # ids in lanes below 8 rows, rows in lanes from 8
def test_the_masked_kernel_picks_the_first_maximum_of_the_allowed_ids_as_its_twin(monkeypatch, dtype, threads, rows):
    monkeypatch.setattr(greedy_kernel.torch, "get_num_threads", lambda: threads)
    weight, hidden = _weight(dtype, 20 + rows), _hidden(rows, dtype, 30 + rows)
    words = _masks(rows, VOCAB, seed=rows, extra_words=rows % 2)
    unmasked = F.linear(hidden, weight).max(dim=-1).indices
    for row in range(0, rows, 2):  # these rows forbid their unmasked answer: the masks must change it
        words[row, unmasked[row] // 32] &= ~(torch.tensor(1, dtype=torch.int32) << int(unmasked[row] % 32))
    values, ids = greedy_kernel.greedy_max(weight, hidden, words)
    want = _masked_twin(weight, hidden, words)
    allowed = _allowed_bits(words, VOCAB)
    logits = F.linear(hidden.double(), weight.double()).masked_fill(~allowed, float("-inf"))
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * top2[:, 0].abs().clamp(min=1.0)  # a single allowed id is clear
    assert clear.float().mean() > 0.6
    assert torch.equal(ids[clear], want[clear])
    assert allowed[torch.arange(rows), ids][allowed.any(dim=-1)].all()  # every row that allows an id gets one
    nothing = ~allowed.any(dim=-1)
    assert torch.equal(ids[nothing], torch.zeros_like(ids[nothing]))  # as argmax over -inf
    assert torch.isinf(values[nothing].float()).all()
    assert (ids[::2] != unmasked[::2]).all()


@pytest.mark.parametrize("rows", [3, 40])
def test_the_masked_kernel_keeps_the_first_of_tied_allowed_ids(rows):
    weight, hidden = _weight(torch.float32, 11), _hidden(rows, torch.float32, 12)
    weight[1030] = weight[700] = weight[5] = 40.0 * hidden[-1]  # a tie across tiles
    words = torch.full((rows, 33), -1, dtype=torch.int32)
    words[-1, 0] = 0  # id 5 forbidden: 700 is the first allowed of the tie
    _, ids = greedy_kernel.greedy_max(weight, hidden, words)
    assert ids[-1] == 700
    words[-1] = 0
    words[-1, 1030 // 32] = 1 << (1030 % 32)  # only 1030
    assert greedy_kernel.greedy_max(weight, hidden, words)[1][-1] == 1030


def test_a_mask_too_narrow_for_the_vocabulary_is_refused():
    weight, hidden = _weight(torch.float32), _hidden(4, torch.float32)
    with pytest.raises(ValueError, match="int32"):
        greedy_kernel.greedy_max(weight, hidden, torch.full((4, 32), -1, dtype=torch.int32))  # 1024 < 1037 ids
    with pytest.raises(ValueError, match="int32"):
        greedy_kernel.greedy_max(weight, hidden, torch.full((3, 33), -1, dtype=torch.int32))


def test_greedy_tokens_takes_masks_only_where_the_kernel_serves_one_rank(monkeypatch):
    lm_head = ParallelLMHead(VOCAB, HIDDEN)
    lm_head.weight.normal_(generator=torch.Generator().manual_seed(13))
    hidden = _hidden(16, torch.float32, 14)
    words = _masks(16, VOCAB, seed=15)
    assert greedy_head.masked_greedy_serves(lm_head, torch.float32)
    want = greedy_kernel.greedy_max(lm_head.weight, hidden, words)[1]
    assert torch.equal(greedy_head.greedy_tokens(lm_head, hidden, words), want)
    monkeypatch.setattr(lm_head, "tp_size", 2)
    assert not greedy_head.masked_greedy_serves(lm_head, torch.float32)
    with pytest.raises(ValueError, match="one rank"):
        greedy_head.greedy_tokens(lm_head, hidden, words)


def _kernel_order(weight: torch.Tensor, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of greedy_top given the kernel's own logits: the masked kernel, one allowed id at a time, gives
    each logit exactly as the kernel computes it; then a stable sort (value descending, id ascending)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    logits = torch.empty(rows, vocab)
    for v in range(vocab):
        words = torch.zeros(rows, -(-vocab // 32), dtype=torch.int32)
        words[:, v // 32] = torch.tensor(1 << (v % 32)).to(torch.int32)
        logits[:, v] = greedy_kernel.greedy_max(weight, hidden, words)[0].float()
    order = torch.sort(-logits, dim=-1, stable=True).indices[:, :k]
    return logits.gather(1, order), order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("rows", [3, 8, 40])  # ids in lanes, rows in lanes
def test_top_k_is_the_kernels_logits_in_order_with_ties_by_id(monkeypatch, dtype, threads, rows):
    monkeypatch.setattr(greedy_kernel.torch, "get_num_threads", lambda: threads)
    vocab = 300
    weight, hidden = _weight(dtype, 40 + rows, vocab), _hidden(rows, dtype, 41 + rows)
    weight[250] = weight[17] = weight[130] = 3.0 * hidden[0]  # a three-way tie across threads' ranges, on top
    weight[64:70] = weight[3]  # ties in the middle
    values, ids = greedy_kernel.greedy_top(weight, hidden, 12)
    want_values, want_ids = _kernel_order(weight, hidden, 12)
    assert torch.equal(ids, want_ids) and torch.equal(values, want_values)
    assert ids[0, :3].tolist() == [17, 130, 250]
    assert torch.equal(ids[:, 0], greedy_kernel.greedy_max(weight, hidden)[1])


def test_top_k_never_keeps_nan_and_pads_rows_with_few_finite_logits():
    weight, hidden = _weight(torch.float32, 50, 100), _hidden(9, torch.float32, 51)
    weight[7] = float("nan")
    weight[20:] = float("-inf") * torch.sign(hidden[-1])  # the last row: -inf from id 20 on (0 * inf is nan)
    values, ids = greedy_kernel.greedy_top(weight, hidden, 30)
    assert not (ids == 7).any() and not torch.isnan(values).any()
    last = ids[-1]
    assert set(last[last >= 0].tolist()) <= set(range(20)) - {7} and (last[last < 0] == -1).all()
    assert (last == -1).any() and torch.isinf(values[-1][last == -1]).all()


@pytest.mark.parametrize("rows", [3, 16])  # ids in lanes, rows in lanes
def test_top_k_keeps_a_step_whose_first_candidate_is_nan(rows):
    weight, hidden = _weight(torch.float32, 52, 300), _hidden(rows, torch.float32, 53)
    weight[3] = 40.0 * hidden[0]  # row 0's best id, in the rows-in-lanes step of ids 0..7
    weight[0] = float("nan")  # that step's first candidate
    ids = greedy_kernel.greedy_top(weight, hidden, 4)[1]
    assert ids[0, 0] == 3 == greedy_kernel.greedy_max(weight, hidden)[1][0]


def test_top_k_outside_its_bounds_is_refused():
    weight, hidden = _weight(torch.float32), _hidden(2, torch.float32)
    for k in (0, greedy_kernel.TOP_K_MAX + 1):
        with pytest.raises(ValueError, match="top-k"):
            greedy_kernel.greedy_top(weight, hidden, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 64])
def test_rows_recomputed_as_in_their_batch_get_the_same_values_bit_for_bit(dtype, rows):
    weight, hidden = _weight(dtype, 60 + rows), _hidden(rows, dtype, 61 + rows)
    words = _masks(rows, VOCAB, seed=62 + rows)
    picked = [1, 3, 4]
    for masked in (None, words):
        values, ids = greedy_kernel.greedy_max(weight, hidden, masked)
        part = None if masked is None else masked[picked]
        got_values, got_ids = greedy_kernel.greedy_max(weight, hidden[picked], part, as_batch_of=rows)
        assert torch.equal(got_ids, ids[picked]) and torch.equal(got_values, values[picked])
    top_values = greedy_kernel.greedy_top(weight, hidden, 4)[0]
    assert torch.equal(top_values[:, 0], greedy_kernel.greedy_max(weight, hidden)[0].float())


class _Masks:
    """PendingMasks on demand over fixed masks: a row's check answers from its mask; the `early` rows' masks are
    filled before the head (as where the grammar forces bytes), and their check never answers."""

    beside_forward = False

    def __init__(self, words: torch.Tensor, early: set[int]) -> None:
        self.words = words
        self.early = early
        self.filled: list[int] = []

    def prepared(self) -> list[int]:
        return sorted(self.early)

    def first_allowed(self, rows: list[int], candidates: list[list[int]]) -> list[int]:
        allowed = _allowed_bits(self.words, VOCAB)
        return [
            -1 if i in self.early else next((t for t in ids if t >= 0 and allowed[i, t]), -1)
            for i, ids in zip(rows, candidates)
        ]

    def fill_rows(self, rows: list[int]) -> np.ndarray:
        self.filled += [i for i in rows if i not in self.early]
        return self.words[rows].numpy()


@pytest.mark.parametrize("batch", [6, 40])  # ids in lanes, rows in lanes
def test_checked_greedy_tokens_are_the_masked_kernels_tokens(monkeypatch, batch):
    """Rows settled by the check of their kept ids, rows whose masks were filled before the head, rows recomputed
    with a narrow or a wide mask, among unconstrained rows: every id is the single masked pass's, bit for bit."""
    monkeypatch.setattr(greedy_head, "NARROW_MASK", 64)
    lm_head = ParallelLMHead(VOCAB, HIDDEN)
    with torch.no_grad():
        lm_head.weight.copy_(_weight(torch.float32, 70 + batch))
    hidden = _hidden(batch, torch.float32, 71 + batch)
    rows = list(range(1, batch, 2)) if batch > 8 else list(range(batch))
    words = _masks(len(rows), VOCAB, seed=72 + batch)
    top = greedy_kernel.greedy_top(lm_head.weight, hidden, greedy_head.KEPT_IDS)[1]
    for i, row in enumerate(rows[: len(rows) // 2]):  # the first half forbids their best id: not settled at once
        best = int(top[row, 0])
        words[i, best // 32] &= ~(torch.tensor(1, dtype=torch.int32) << (best % 32))
    masks = _Masks(words, early={0, 2})
    got = greedy_head.checked_greedy_tokens(lm_head, hidden, rows, masks)
    dense = StepBitmask(rows, words).row_words(batch, VOCAB)
    want = greedy_kernel.greedy_max(lm_head.weight, hidden, dense)[1]
    assert torch.equal(got, want)
    filled = set(masks.filled)
    assert filled and len(filled) + 2 < len(rows)  # rows settled by their checks, rows that needed their masks
    allowed = _allowed_bits(words, VOCAB)
    assert any(not allowed[i, top[rows[i]]].any() for i in filled)  # a row that needed the second pass
