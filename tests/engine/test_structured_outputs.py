"""Structured outputs in the engine: with the random embedded model (gibberish by construction) every
constrained answer still parses and validates against its JSON schema, matches its regex, is one of its
choices or is a sentence of its grammar, and ends by itself ("stop"); greedy constrained answers do not
depend on batching, chunked prefill or preemption; specs that cannot compile are refused where they enter;
the bitmask is applied exactly like a full masked_fill."""

import concurrent.futures
import json
import random
import re
import threading
import time

import jsonschema
import numpy as np
import pytest
import torch

from omnistream import LLM, SamplingParams
from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.structured_output import masks
from omnistream.engine.core.structured_output.compiler import GrammarCompiler, GrammarError
from omnistream.engine.core.structured_output.manager import StructuredOutputManager
from omnistream.engine.core.structured_output.masks import (
    MaskFiller,
    MaskRow,
    MasksBesideForward,
    MasksOnDemand,
    RowQueue,
    mask_threads,
)
from omnistream.engine.worker import greedy_kernel, model_runner
from omnistream.engine.worker.token_bitmask import StepBitmask, apply_token_bitmask
from omnistream.scheduler.request import Request
from omnistream.scheduler.structured_outputs import StructuredOutputsParams as Spec

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": -5, "maximum": 500},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "name": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "count", "color", "tags", "name"],
    "additionalProperties": False,
}
REGEX = r"[a-f]{2,5}-\d{2}(\.[xyz])?"
CHOICES = ["alpha", "beta", "gamma delta"]
LARK = 'start: greeting " " NAME ("," " " NAME)? "!"\ngreeting: "hi" | "hello"\nNAME: /[a-z]{1,6}/'
LARK_LANGUAGE = r"(hi|hello) [a-z]{1,6}(, [a-z]{1,6})?!"


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", num_kv_blocks=256)


def _params(spec: Spec, seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=200, structured_outputs=spec, **kwargs)


def test_every_constrained_answer_of_the_random_model_is_valid(llm):
    specs = [Spec(json=json.dumps(SCHEMA)), Spec(regex=REGEX), Spec(choice=CHOICES), Spec(grammar=LARK)]
    prompts, params = [], []
    for seed in range(6):
        for spec in specs:
            prompts.append(f"Answer {seed}:")
            params.append(_params(spec, seed))
    outs = llm.generate(prompts, params, use_tqdm=False)
    _assert_complete_and_valid(outs, params, SCHEMA)


def test_any_json_object_admits_objects_only(llm):
    """(Its keys and strings are unbounded, so the random model need not close one within max_tokens.)"""
    compiler = llm.engine.structured_output.compiler
    tokenizer = llm.get_tokenizer()
    for text, valid in [('{"a": [1, {"b": null}], "c": "d"}', True), ("[1, 2]", False), ('"x"', False)]:
        matcher = compiler.compile(Spec(json_object=True))
        assert matcher.consume_tokens(tokenizer.encode(text)) == valid
        assert matcher.is_accepting() == valid


def test_n_samples_and_greedy_rows_are_each_valid(llm):
    outs = llm.generate(
        "Pick:",
        SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=50, structured_outputs=Spec(regex=REGEX)),
        use_tqdm=False,
    )
    assert len(outs[0].outputs) == 4
    assert all(re.fullmatch(REGEX, o.text) for o in outs[0].outputs)
    greedy = llm.generate(
        "Pick:", SamplingParams(temperature=0.0, max_tokens=50, structured_outputs=Spec(choice=CHOICES)), use_tqdm=False
    )
    assert greedy[0].outputs[0].text in CHOICES


def test_a_stop_string_still_ends_a_constrained_answer(llm):
    out = llm.generate(
        "x",
        SamplingParams(temperature=0.0, max_tokens=50, stop=["-"], structured_outputs=Spec(regex=r"abc-\d\d")),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].text == "abc" and out.outputs[0].finish_reason == "stop"


def test_greedy_constrained_answers_do_not_depend_on_batching_or_preemption():
    rng = random.Random(5)
    prompts = [[rng.randrange(151643) for _ in range(rng.randint(3, 60))] for _ in range(16)]
    specs = [Spec(json=json.dumps(SCHEMA)), Spec(regex=REGEX), None, Spec(grammar=LARK)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=specs[i % 4]) for i in range(len(prompts))
    ]
    alone_llm = LLM(dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    alone = [
        alone_llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0].outputs[0].token_ids
        for p, sp in zip(prompts, params)
    ]
    batched_llm = LLM(dtype="float32", num_kv_blocks=14, max_num_batched_tokens=48)
    outs = batched_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert batched_llm.engine.scheduler.make_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert not batched_llm.engine.structured_output._grammars  # every matcher was dropped with its request


@pytest.mark.parametrize(
    "spec, problem",
    [
        (Spec(json='{"type": "object", "properties": {"a": {"type": "nonsense"}}}'), "nonsense"),
        (Spec(json='{"type": '), "not valid JSON"),
        (Spec(json='{"type": "integer", "minimum": 5, "maximum": 2}'), "Unsatisfiable"),
        (Spec(regex="a(b"), "unclosed group"),
        (Spec(regex="[^\\s\\S]"), "unsatisfiable"),
        (Spec(grammar="start: missing_rule"), "missing_rule"),
    ],
)
def test_specs_that_cannot_compile_are_refused_naming_the_problem(llm, spec, problem):
    with pytest.raises(GrammarError, match="structured_outputs") as info:
        llm.generate("x", SamplingParams(structured_outputs=spec), use_tqdm=False)
    assert problem in str(info.value)
    assert llm.generate("x", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_a_spec_sets_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        Spec(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        Spec()
    with pytest.raises(ValueError, match="over the limit"):
        Spec(regex="a" * (300 * 1024))


@pytest.mark.parametrize("kind", ["sparse", "dense", "random"])
def test_the_bitmask_is_applied_like_a_full_masked_fill(kind):
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 6, 32 * 40 + 8  # logits wider than the mask: the padding rows are forbidden
    words = 40
    if kind == "sparse":
        mask = torch.zeros(rows, words, dtype=torch.int32)
        mask[:, 3] = 0x00F0F00F
    elif kind == "dense":
        mask = torch.full((rows, words), -1, dtype=torch.int32)
        mask[:, ::4] = 0x7FFF0001
    else:
        mask = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32, generator=gen)
    logits = torch.randn(rows + 2, vocab, generator=gen)
    target = [4, 0, 7, 2, 5, 1]
    expected = logits.clone()
    bits = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little").astype(bool)
    allowed = torch.zeros(rows, vocab, dtype=torch.bool)
    allowed[:, : words * 32] = torch.from_numpy(bits)
    for i, row in enumerate(target):
        expected[row].masked_fill_(~allowed[i], float("-inf"))
    apply_token_bitmask(logits, mask, target)
    assert torch.equal(logits, expected)


def test_a_large_greedy_batch_masks_checks_or_corrects_the_greedy_head_exactly_like_full_masked_logits(
    llm, monkeypatch
):
    """From 64 rows the greedy head serves the batch. With every mask filled beside the forward, the compiled head
    takes them and picks among the allowed tokens itself; with masks on demand, the grammar checks each row's best
    ids and only the rows none of them settles get a mask and a masked pass; without the masked head, the rows
    whose grammar forbids their greedy token are recomputed. All answer exactly like full logits + mask (the greedy
    head switched off), and every answer is valid; a few rows are unconstrained."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 5}},
        "required": ["ok", "name"],
        "additionalProperties": False,
    }  # short answers: a fast test
    specs = [Spec(json=json.dumps(schema)), Spec(regex=REGEX), Spec(choice=CHOICES), Spec(grammar=LARK), None]
    prompts = [f"Row {i}:" for i in range(64)]
    params = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=specs[i % 5]) for i in range(64)]
    corrected, masked_heads, settled, missed = [], [], [], []
    correct_greedy, greedy_tokens = StepBitmask.correct_greedy, model_runner.greedy_tokens
    first_allowed, fill_rows = MasksOnDemand.first_allowed, MasksOnDemand.fill_rows

    def counted(self, token_ids, *args):
        out = correct_greedy(self, token_ids, *args)
        corrected.append(int((out != token_ids).sum()))
        return out

    def noted(lm_head, hidden, allowed=None):
        masked_heads.append(allowed is not None)
        return greedy_tokens(lm_head, hidden, allowed)

    def checked(self, rows, candidates):
        chosen = first_allowed(self, rows, candidates)
        settled.append(sum(token >= 0 for token in chosen))
        return chosen

    def filled(self, rows):
        missed.append(len(rows))
        return fill_rows(self, rows)

    monkeypatch.setattr(StepBitmask, "correct_greedy", counted)
    monkeypatch.setattr(model_runner, "greedy_tokens", noted)
    monkeypatch.setattr(MasksOnDemand, "first_allowed", checked)
    monkeypatch.setattr(MasksOnDemand, "fill_rows", filled)
    manager = llm.engine.structured_output
    monkeypatch.setattr(manager, "fill_mode", "beside")  # every mask, filled while the forward runs
    masked = llm.generate(prompts, params, use_tqdm=False)
    kernel = greedy_kernel.load_kernel() is not None
    assert (sum(masked_heads) > 10) == kernel and (sum(corrected) == 0) == kernel and not settled
    monkeypatch.setattr(manager, "fill_mode", "on-demand")  # the best ids checked, masks for the rows left
    checked_ids = llm.generate(prompts, params, use_tqdm=False)
    if kernel:  # most rows settled by their best ids, some needed a mask
        assert sum(settled) > 10 and sum(missed) > 64 and sum(corrected) == 0
    monkeypatch.setattr(model_runner, "masked_greedy_serves", lambda lm_head, dtype: False)
    corrected.clear()
    fast = llm.generate(prompts, params, use_tqdm=False)
    assert sum(corrected) > 64  # the greedy head's tokens were corrected, often
    monkeypatch.setattr(model_runner, "greedy_pays", lambda lm_head, num_rows: False)
    monkeypatch.setattr(manager, "fill_mode", "beside")
    slow = llm.generate(prompts, params, use_tqdm=False)
    want = [o.outputs[0].token_ids for o in slow]
    assert [o.outputs[0].token_ids for o in fast] == want
    assert [o.outputs[0].token_ids for o in checked_ids] == want
    assert [o.outputs[0].token_ids for o in masked] == want
    constrained = [i for i in range(64) if specs[i % 5] is not None]
    _assert_complete_and_valid([masked[i] for i in constrained], [params[i] for i in constrained], schema)


def test_tensor_parallel_ranks_receive_the_masks_and_answer_like_one_rank(llm):
    """With TP the executor waits for the masks and broadcasts them in the step: every rank masks alike."""
    specs = [Spec(json=json.dumps(SCHEMA)), Spec(regex=REGEX), Spec(choice=CHOICES)]
    params = [SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=spec) for spec in specs]
    prompts = ["One:", "Two:", "Three:"]
    want = llm.generate(prompts, params, use_tqdm=False)
    with LLM(dtype="float32", num_kv_blocks=64, tensor_parallel_size=2, distributed_timeout_s=20) as tp2:
        got = tp2.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert re.fullmatch(REGEX, got[1].outputs[0].text) and got[2].outputs[0].text in CHOICES


def _mask_rows(compiler, specs: list[Spec], lineages: int = 1) -> list[MaskRow]:
    """One row per spec, the rows of one spec copying its templates (lineages) in turn."""
    seen: dict[tuple[str, str], int] = {}
    rows = []
    for i, spec in enumerate(specs):
        compiler.compile(spec)
        compiler.add_lineages(spec, lineages)
        seen[spec.key] = seen.get(spec.key, -1) + 1
        template = compiler.template(spec, seen[spec.key] % lineages)
        rows.append(MaskRow(template.deep_copy(), i, id(template), compiler.checks_tokens(spec)))
    return rows


def test_masks_on_demand_are_filled_only_for_rows_whose_greedy_token_is_not_known_to_be_allowed(llm):
    """The choice row's token is allowed and checked: no mask. The regex and Lark rows' tokens are rejected, and a
    Lark grammar is never checked token by token; the JSON row starts with forced bytes, where the check and the
    mask disagree: those rows get their masks."""
    compiler = llm.engine.structured_output.compiler
    specs = [Spec(json=json.dumps(SCHEMA)), Spec(regex=REGEX), Spec(choice=CHOICES), Spec(grammar=LARK)]
    rows = _mask_rows(compiler, specs)
    filler = MaskFiller(compiler.vocab_size, threads=1)
    full = filler.fill(rows, len(rows))
    allowed = np.unpackbits(full.view(np.uint8), axis=1, bitorder="little").astype(bool)
    chosen = [int(np.flatnonzero(row if i % 2 == 0 else ~row)[0]) for i, row in enumerate(allowed)]
    special = compiler.special_tokens
    got = MasksOnDemand(filler, rows, special).result(chosen)
    assert (got[2] == -1).all()  # its token is allowed: no mask computed
    assert np.array_equal(got[[0, 1, 3]], full[[0, 1, 3]])
    assert np.array_equal(MasksOnDemand(filler, rows, special).result(), full)
    assert np.array_equal(MasksBesideForward(filler, rows).result(chosen), full)
    assert np.array_equal(MasksOnDemand(filler, rows, special).fill_rows([3, 1]), full[[3, 1]])


@pytest.mark.parametrize("kind", ["json", "strings", "regex", "choice"])
def test_the_first_allowed_candidate_is_the_first_that_the_mask_allows(llm, kind):
    """Along random valid answers, at every state: for lists of candidates mixing allowed, forbidden and special
    ids, first_allowed answers -1 or exactly the first candidate that the state's mask allows, and it answers in
    most states; outside forced bytes, the per-token check agrees with the mask on every id tried."""
    strings = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 3, "maxItems": 3}
    spec = {
        "json": Spec(json=json.dumps(SCHEMA)),
        "strings": Spec(json=json.dumps(strings)),
        "regex": Spec(regex=REGEX),
        "choice": Spec(choice=CHOICES),
    }[kind]
    compiler = llm.engine.structured_output.compiler
    special = compiler.special_tokens
    rng = np.random.default_rng(7)
    answered = states = 0
    for answer in range(3):
        row = _mask_rows(compiler, [spec])[0]
        filler = MaskFiller(compiler.vocab_size, threads=1)
        while not row.matcher.is_stopped():
            lists = []
            for _ in range(6):
                candidates = rng.integers(0, compiler.vocab_size, 8)
                candidates[rng.integers(0, 8)] = rng.choice(np.flatnonzero(special))
                lists.append(candidates.tolist())
            got = [masks.first_allowed(row, c, special) for c in lists]
            forced = bool(row.matcher.compute_ff_bytes())
            tried = rng.integers(0, compiler.vocab_size, 3000).tolist()
            checks = [row.matcher.validate_tokens([t]) == 1 for t in tried]
            bits = np.unpackbits(filler.fill([row], 1).view(np.uint8), bitorder="little").astype(bool)
            allowed = np.flatnonzero(bits)
            with_allowed = [list(c) for c in lists]
            for candidates in with_allowed:
                candidates[rng.integers(0, 8)] = int(rng.choice(allowed))
            got += [masks.first_allowed(row, c, special) for c in with_allowed]
            for candidates, first in zip(lists + with_allowed, got):
                want = next(c for c in candidates if bits[c]) if bits[candidates].any() else -1
                assert first in (-1, want), (candidates, first, want)
            answered += sum(first >= 0 for first in got)
            states += 1
            if not forced:
                assert all(check == bits[t] for t, check in zip(tried, checks) if not special[t])
                assert all(row.matcher.validate_tokens([int(t)]) == 1 for t in allowed if not special[t])
            row.matcher.consume_token(int(rng.choice(allowed)))
        filler.shutdown()
    assert answered > states // 2, (answered, states)  # (a forced state answers none)


def test_on_demand_fills_several_rejected_rows_of_several_lineages_in_one_step(llm):
    """Many rows rejected in one step, spread over two lineages of each spec and filled on two threads: each
    rejected row gets exactly its own mask, each row whose token is checked and allowed keeps every token."""
    compiler = llm.engine.structured_output.compiler
    specs = [Spec(json=json.dumps(SCHEMA)), Spec(regex=REGEX), Spec(choice=CHOICES), Spec(grammar=LARK)] * 3
    rows = _mask_rows(compiler, specs, lineages=2)
    assert len({row.lineage for row in rows}) == 8
    filler = MaskFiller(compiler.vocab_size, threads=2)
    full = filler.fill(rows, len(rows))
    allowed = np.unpackbits(full.view(np.uint8), axis=1, bitorder="little").astype(bool)
    rejected = {1, 2, 3, 5, 6, 8, 11}
    chosen = [int(np.flatnonzero(~row if i in rejected else row)[0]) for i, row in enumerate(allowed)]
    filled = rejected | {0, 4, 8} | {3, 7, 11}  # and the JSON rows (forced bytes) and the Lark rows (never checked)
    for _ in range(3):
        got = MasksOnDemand(filler, rows, compiler.special_tokens).result(chosen)
        for i in range(len(rows)):
            assert np.array_equal(got[i], full[i] if i in filled else np.full_like(full[i], -1)), i
    filler.shutdown()


def test_the_runner_fills_the_masks_the_busy_worker_has_not_taken(llm):
    compiler = llm.engine.structured_output.compiler
    specs = [Spec(json=json.dumps(SCHEMA)), Spec(regex=REGEX), Spec(choice=CHOICES), Spec(grammar=LARK)]
    rows = _mask_rows(compiler, specs)
    filler = MaskFiller(compiler.vocab_size, threads=1)
    full = filler.fill(rows, len(rows))
    assert not (full == -1).all(axis=1).any()  # every row forbids something: the comparison below is real
    release = threading.Event()
    filler.pool.submit(release.wait, 30)  # the filler's thread is busy: no row is taken before the runner asks
    masks_ = MasksBesideForward(filler, rows)
    start = time.monotonic()
    got = masks_.result()
    assert time.monotonic() - start < 10  # without waiting for the busy thread
    release.set()
    masks_.settle()
    assert np.array_equal(got, full)


def test_requests_spread_over_lineages_answer_as_if_they_all_copied_one_template(llm, monkeypatch):
    """The requests of one spec take turns among its lineages, moving to their own (a replay of their tokens) once
    it is compiled; their greedy answers equal those of requests that all copy one template."""
    manager = llm.engine.structured_output
    monkeypatch.setattr(manager, "fill_mode", "beside")
    lineages_per_step = []
    row_queue = RowQueue.__init__

    def noting(self, rows):
        lineages_per_step.append(len({row.lineage for row in rows}))
        row_queue(self, rows)

    monkeypatch.setattr(RowQueue, "__init__", noting)
    schema = dict(SCHEMA, properties=dict(SCHEMA["properties"], name={"type": "string", "maxLength": 9}))
    params = SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=Spec(json=json.dumps(schema)))
    prompts = [f"Lineage {i}:" for i in range(12)]
    spread = llm.generate(prompts, params, use_tqdm=False)
    assert manager.num_lineages >= 2 and max(lineages_per_step) >= 2
    monkeypatch.setattr(manager, "num_lineages", 1)
    lineages_per_step.clear()
    one = llm.generate(prompts, params, use_tqdm=False)
    assert max(lineages_per_step) == 1
    assert [o.outputs[0].token_ids for o in spread] == [o.outputs[0].token_ids for o in one]
    _assert_complete_and_valid(spread, [params] * len(prompts), schema)


def test_a_request_whose_compiled_grammar_left_the_cache_meanwhile_is_released_with_it():
    """The compiler's cache is bounded: a grammar compiled for a waiting request may be evicted before the request
    is released; it is compiled again, and the request gets a matcher."""
    tokenizer = Tokenizer(default_model_path())
    compiler = GrammarCompiler(tokenizer, 152064, tokenizer.eos_token_ids, cache_size=1)
    manager = StructuredOutputManager(compiler)
    specs = [Spec(regex=REGEX), Spec(choice=CHOICES)]
    request = Request("r", [1, 2], SamplingParams(max_tokens=8, structured_outputs=specs[0]), [0], arrival_time=0.0)
    manager.attach(request, specs[0])
    assert request.grammar_pending
    deadline = time.monotonic() + 60
    while compiler.template(specs[0]) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    compiler.compile(specs[1])  # evicts the regex
    assert compiler.template(specs[0]) is None
    assert manager.release_compiled({"r": request}, wait_s=10) == [] and not request.grammar_pending
    assert "r" in manager._grammars and compiler.template(specs[0]) is not None
    manager.shutdown()


def test_threads_filling_masks_never_hold_one_lineage_at_once(monkeypatch):
    """Matchers of one lineage share llguidance's lock: the row queue never gives two threads one lineage, and
    every row is filled once."""
    active: dict[int, int] = {}
    filled: list[int] = []
    lock = threading.Lock()

    def fake_fill(matcher, bitmask, row):
        with lock:
            active[matcher] = active.get(matcher, 0) + 1
            assert active[matcher] == 1
        time.sleep(0.001)
        with lock:
            active[matcher] -= 1
            filled.append(row)

    monkeypatch.setattr(masks.llguidance.numpy, "fill_next_token_bitmask", fake_fill)
    rows = [MaskRow(i % 3, i, i % 3) for i in range(30)]  # the lineage stands in for the matcher
    queue = RowQueue(rows)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(queue.fill, None) for _ in range(4)]:
            future.result()
    assert sorted(filled) == list(range(30))


def test_masks_are_filled_beside_the_forward_only_on_cores_the_forward_leaves_free(monkeypatch):
    monkeypatch.setattr(masks.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(masks.torch, "get_num_threads", lambda: 4)
    assert mask_threads("cpu") == (4, False)  # every core runs torch: fill on demand, on all of them
    assert mask_threads("cuda") == (4, True)  # a GPU forward leaves the CPU free
    monkeypatch.setattr(masks.torch, "get_num_threads", lambda: 3)
    assert mask_threads("cpu") == (1, True)


def _assert_complete_and_valid(outs: list, params: list[SamplingParams], schema: dict) -> None:
    """Every answer ended by its grammar and matches its spec (JSON against `schema`, regex, choice, Lark)."""
    for out, sp in zip(outs, params):
        text, spec = out.outputs[0].text, sp.structured_outputs
        assert out.outputs[0].finish_reason == "stop", text
        if spec.json is not None:
            jsonschema.validate(json.loads(text), schema)
        elif spec.regex is not None:
            assert re.fullmatch(REGEX, text), text
        elif spec.choice is not None:
            assert text in CHOICES
        else:
            assert re.fullmatch(LARK_LANGUAGE, text), text
