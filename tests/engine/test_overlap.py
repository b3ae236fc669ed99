"""Overlapped scheduling (engine/core/steps.py): step N+1 is scheduled and launched before step N is settled.

The scheduler tests' fake runner (it checks the KV of every position it reads) sits behind a launch/result interface
that answers one step late: a token it sampled is known to it (its last_sampled) before the scheduler hears of it,
and a row the scheduler plans with a placeholder reads it from there. Driven by the same event-triggered script,
the synchronous and the overlapped loops must report the same tokens and finish reasons per request, through late
stops, an abort and a preemption of requests with a step in flight, a chunked prefill with prompt logprobs that is
preempted, and a session whose turn ends late, is cancelled and has its input rolled back. Then the real tiny model
on CPU with async_scheduling forced on (greedy, seeded, logprobs, grammars, prompt logprobs, two TP ranks), and on
CUDA where there is one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import msgspec
import pytest
import torch

from omnistream import LLM, SamplingParams
from omnistream.engine.core.steps import OverlappedSteps, Steps, SyncSteps, make_steps
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.entrypoints.args import engine_kwargs
from omnistream.engine.entrypoints.cli import build_parser
from omnistream.engine.worker.step_future import StepFuture
from omnistream.scheduler.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from omnistream.scheduler.policy import make_policy
from omnistream.scheduler.request import Request, RequestStatus
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig
from omnistream.scheduler.structured_outputs import StructuredOutputsParams as Spec
from tests.scheduler.conftest import FakeRunner, check_invariants

BLOCK = 4
STOPS = list(range(100, 150))  # about one fake token in eighteen ends its request: stops come at varied lengths


class LateRunner:
    """FakeRunner with launch(): outputs are read only through the future, and a row whose last token the
    scheduler has not been told (a placeholder) gets this runner's own last sampled token."""

    def __init__(self) -> None:
        self.runner = FakeRunner(BLOCK)
        self.last_sampled: dict[str, int] = {}
        self.unconfirmed: dict[str, list[int]] = {}  # tokens it appended itself that the scheduler has not sent yet
        self.events: list[tuple[str, int]] = []  # ("launch" | "result", step number)
        self.num_sampled = 0

    def launch(self, scheduler_output: SchedulerOutput, grammar_bitmask: object = None) -> StepFuture:
        assert grammar_bitmask is None  # no constrained rows in the fake-runner tests
        step = sum(1 for kind, _ in self.events if kind == "launch")
        self.events.append(("launch", step))
        output = self.runner.execute(self._with_placeholders(scheduler_output))
        self.last_sampled.update(zip(output.sampled_req_ids, output.sampled_token_ids))
        self.num_sampled += len(output.sampled_req_ids)
        return StepFuture(lambda: self._answer(step, output))

    def _answer(self, step: int, output: ModelRunnerOutput) -> ModelRunnerOutput:
        self.events.append(("result", step))
        return output

    def _with_placeholders(self, scheduler_output: SchedulerOutput) -> SchedulerOutput:
        for req_id in scheduler_output.finished_req_ids + scheduler_output.preempted_req_ids:
            self.unconfirmed.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self.unconfirmed[new.req_id] = []
        cached = []
        for data in scheduler_output.scheduled_cached_reqs:
            mine, tokens = self.unconfirmed[data.req_id], list(data.new_token_ids)
            confirmed = min(len(mine), len(tokens))
            assert tokens[:confirmed] == mine[:confirmed], "the scheduler settled another token than was sampled"
            del mine[:confirmed], tokens[:confirmed]
            known = len(self.runner.reqs[data.req_id].token_ids) + len(tokens)
            end = data.num_computed_tokens + scheduler_output.num_scheduled_tokens[data.req_id]
            if end > known:
                assert end == known + 1, "more than one token in flight"
                tokens.append(self.last_sampled[data.req_id])
                mine.append(tokens[-1])
            cached.append(msgspec.structs.replace(data, new_token_ids=tokens))
        return msgspec.structs.replace(scheduler_output, scheduled_cached_reqs=cached)


class NoGrammars:
    """The structured-output manager's interface with no grammar attached."""

    compiling = False

    def release_compiled(self, requests: dict[str, Request], wait_s: float = 0.0) -> list[EngineCoreOutput]:
        return []

    def fill_bitmask(self, scheduler_output: SchedulerOutput, requests: dict[str, Request]) -> None:
        pass

    def advance(self, model_output: ModelRunnerOutput) -> set[str]:
        return set()

    def forget_finished(self, requests: dict[str, Request]) -> None:
        pass

    def forget(self, req_id: str) -> None:
        pass


class Run:
    """One loop over a scheduler and a LateRunner; collects each request's tokens and finish reasons."""

    def __init__(self, overlap: bool, num_kv_blocks: int = 64, max_num_batched_tokens: int = 64) -> None:
        self.scheduler = Scheduler(SchedulerConfig(max_model_len=256, num_kv_blocks=num_kv_blocks, block_size=BLOCK,
                                                   max_num_batched_tokens=max_num_batched_tokens))
        self.runner = LateRunner()
        self.steps: Steps = make_steps(overlap, self.scheduler, self.runner, NoGrammars())
        self.tokens: dict[str, list[int]] = {}
        self.finishes: dict[str, list[str]] = {}
        self.notes: dict[str, object] = {}  # what a script saw on the way
        self.prompt_logprobs: dict[str, list[int]] = {}  # the scored token of each prompt position reported

    def add(self, req_id: str, prompt_len: int, max_tokens: int, open_input: bool = False, **params) -> None:
        prompt = [10 + (7 * len(self.scheduler.requests) + 3 * i) % 50 for i in range(prompt_len)]
        params = SamplingParams(max_tokens=1 if open_input else max_tokens, **params)
        self.scheduler.add_request(Request(req_id, prompt, params, STOPS, arrival_time=0.0, open_input=open_input))

    def step(self) -> None:
        for output in self.steps.step():
            self.tokens.setdefault(output.req_id, []).extend(output.new_token_ids)
            scored = [entry.token_ids[0] for entry in output.new_prompt_logprobs]
            self.prompt_logprobs.setdefault(output.req_id, []).extend(scored)
            if output.finish_reason is not None:
                self.finishes.setdefault(output.req_id, []).append(output.finish_reason)
        check_invariants(self.scheduler)

    def run(self, until: Callable[[], bool] | None = None, max_steps: int = 500) -> None:
        """Step until `until()` holds (by default: until nothing is left to compute or settle)."""
        for _ in range(max_steps):
            if until() if until is not None else not (self.has_work() or self.steps.in_flight):
                return
            self.step()
        raise AssertionError("the loop did not get there")

    def has_work(self) -> bool:
        return any(r.has_work for r in self.scheduler.requests.values()) or bool(self.scheduler.finished_req_ids)

    def count(self, req_id: str) -> int:
        return len(self.tokens.get(req_id, []))


def _both(script: Callable[[Run], None], **config) -> tuple[Run, Run]:
    """The script run by the synchronous and by the overlapped loop: the same tokens and finishes, all blocks freed."""
    runs = []
    for overlap in (False, True):
        run = Run(overlap, **config)
        script(run)
        run.run()
        assert run.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == run.scheduler.config.num_kv_blocks
        runs.append(run)
    sync, overlapped = runs
    assert overlapped.tokens == sync.tokens
    assert overlapped.finishes == sync.finishes
    return sync, overlapped


def test_overlapped_loop_launches_ahead_and_reports_what_the_sync_loop_reports() -> None:
    def script(run: Run) -> None:
        for i in range(6):
            run.add(f"r{i}", 3 + 5 * i, max_tokens=4 + 7 * i)
        run.run(lambda: run.count("r0") >= 1)
        run.add("late", 9, max_tokens=12)

    sync, overlapped = _both(script)
    reasons = [reason for finishes in sync.finishes.values() for reason in finishes]
    assert "stop" in reasons and "length" in reasons  # eos seen (one step late when overlapped), max_tokens reached
    # the overlapped loop computed a token past each eos, which it dropped
    assert overlapped.runner.num_sampled > sync.runner.num_sampled == sum(map(len, sync.tokens.values()))
    events = overlapped.runner.events
    assert events.index(("launch", 3)) < events.index(("result", 2))  # step 3 was launched before step 2 was read
    assert all(kind == "result" or step < 2 or ("result", step - 2) in events[:i]
               for i, (kind, step) in enumerate(events))  # never more than two steps in flight
    sync_events = sync.runner.events
    assert sync_events == [(kind, step) for step in range(len(sync_events) // 2) for kind in ("launch", "result")]


def test_an_abort_and_a_preemption_make_in_flight_results_stale() -> None:
    def script(run: Run) -> None:
        for i in range(5):
            run.add(f"r{i}", 6 + 3 * i, max_tokens=40, ignore_eos=i != 1)
        run.run(lambda: run.count("r1") >= 2)
        run.scheduler.finish_requests("r1", RequestStatus.FINISHED_ABORTED)  # its next token is in flight
        run.add("r1", 5, max_tokens=3, ignore_eos=True)  # the same id again: the old result must not pass for it

    sync, overlapped = _both(script, num_kv_blocks=20)  # too few blocks for all: the newest are preempted
    assert len(sync.tokens["r1"]) == 2 + 3 and sync.finishes["r1"] == ["length"]
    assert overlapped.scheduler.num_preemptions > 0 and sync.scheduler.num_preemptions > 0


def test_prompt_logprobs_of_a_preempted_chunked_prefill_are_reported_once() -> None:
    def script(run: Run) -> None:
        run.add("r0", 10, max_tokens=40, ignore_eos=True)
        run.add("r1", 10, max_tokens=40, ignore_eos=True)
        run.run(lambda: run.count("r0") >= 1)
        run.add("p", 30, max_tokens=3, ignore_eos=True, prompt_logprobs=1)  # the newest: preempted first

    sync, overlapped = _both(script, num_kv_blocks=16, max_num_batched_tokens=8)
    assert overlapped.prompt_logprobs == sync.prompt_logprobs
    prompt = [10 + (7 * 2 + 3 * i) % 50 for i in range(30)]
    assert sync.prompt_logprobs["p"] == prompt[1:]
    assert overlapped.scheduler.num_preemptions > 0


def test_a_session_turn_that_stops_late_is_cancelled_and_rolled_back() -> None:
    def script(run: Run) -> None:
        scheduler = run.scheduler
        run.add("s", 7, max_tokens=1, open_input=True)
        scheduler.append_input("s", [60, 61, 62, 63, 64])
        run.run()
        scheduler.commit_turn("s", [70, 71], SamplingParams(max_tokens=30))
        run.run(lambda: "s" in run.finishes)  # the turn ends (eos or max_tokens): one step late when overlapped
        first_turn = run.count("s")
        scheduler.append_input("s", [80, 81, 82, 83, 84, 85])
        run.step()
        scheduler.rollback_input("s", scheduler.requests["s"].num_tokens - 4)
        scheduler.commit_turn("s", [90], SamplingParams(max_tokens=30, ignore_eos=True))
        run.run(lambda: run.count("s") == first_turn + 3)
        assert scheduler.cancel_turn("s")  # overlapped, the next token is in flight: it is dropped
        scheduler.append_input("s", [95, 96])
        run.run()
        session = scheduler.requests["s"]
        run.notes.update(tokens=list(session.all_token_ids), accepting=session.accepting_input,
                         placeholders=session.num_placeholders, in_flight=run.steps.in_flight)
        scheduler.finish_requests("s", RequestStatus.FINISHED_ABORTED)  # close it: its blocks are freed

    sync, overlapped = _both(script)
    assert overlapped.notes == sync.notes
    assert overlapped.notes["accepting"] and overlapped.notes["placeholders"] == 0 and not overlapped.notes["in_flight"]
    assert overlapped.runner.num_sampled == sync.runner.num_sampled + 2  # the late stop's token and the cancelled one


def test_blocks_filled_by_tokens_in_flight_still_enter_the_prefix_cache() -> None:
    def script(run: Run) -> None:
        prompt = [11, 12, 13, 14, 15, 16]
        run.scheduler.add_request(Request("a", prompt, SamplingParams(max_tokens=14, ignore_eos=True), STOPS, 0.0))
        run.run()
        again = prompt + run.tokens["a"] + [17]  # a's 20 tokens, then one more
        run.scheduler.add_request(Request("b", again, SamplingParams(max_tokens=1), STOPS, 0.0))
        run.run()
        run.notes["hits"] = run.scheduler.kv_cache_manager.prefix_cache_hits

    sync, overlapped = _both(script)
    assert overlapped.notes["hits"] == sync.notes["hits"] == 16  # a's last token was sampled, never computed


def test_a_decode_whose_token_is_in_flight_is_still_a_decode_to_the_policy() -> None:
    prefill = Request("p", list(range(10, 30)), SamplingParams(), [], arrival_time=0.0)
    prefill.num_computed_tokens = 8  # a chunked prefill, older
    decode = Request("d", list(range(10, 15)), SamplingParams(), [], arrival_time=1.0)
    decode.num_computed_tokens, decode.num_placeholders = 5, 1  # its next input token is still in flight
    assert make_policy("fcfs").running_order([prefill, decode]) == [decode, prefill]


def test_a_request_whose_last_token_is_in_flight_is_not_scheduled_again() -> None:
    run = Run(overlap=True)
    run.scheduler.add_request(Request("a", [11, 12, 13, 14, 15], SamplingParams(max_tokens=3), [], arrival_time=0.0))
    run.run()
    assert len(run.tokens["a"]) == 3 and run.finishes["a"] == ["length"]
    assert run.runner.num_sampled == 3  # nothing was computed past max_tokens


# ---- the real tiny model on CPU --------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Once upon a time", "Hi", "1 2 3 4 5"]


def _outputs(llm: LLM, params: list[SamplingParams]) -> list[tuple]:
    """Per prompt: tokens, finish reason, stop reason, and per position the (token, rank, logprob) alternatives."""
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason,
             [sorted((token, lp.rank, lp.logprob) for token, lp in entry.items())
              for entry in o.outputs[0].logprobs or []])
            for o in outs]


def _assert_same(got: list[tuple], expected: list[tuple]) -> None:
    """Same tokens, reasons, alternatives and ranks; logprobs to float32 rounding (a step's batch may differ: the
    overlapped loop computes a row past a late stop)."""
    assert [out[:3] for out in got] == [out[:3] for out in expected]
    for out, ref in zip(got, expected, strict=True):
        assert [[entry[:2] for entry in row] for row in out[3]] == [[entry[:2] for entry in row] for row in ref[3]]
        values = [entry[2] for row in out[3] for entry in row]
        assert values == pytest.approx([entry[2] for row in ref[3] for entry in row], abs=1e-4)


@pytest.fixture(scope="module")
def llms():
    sync = LLM(dtype="float32", num_kv_blocks=64, async_scheduling=False)
    overlapped = LLM(dtype="float32", num_kv_blocks=64, async_scheduling=True)
    yield sync, overlapped
    sync.shutdown()
    overlapped.shutdown()


def test_async_scheduling_is_off_on_cpu_by_default_and_reaches_the_engine(llms) -> None:
    sync, overlapped = llms
    assert isinstance(sync.engine.steps, SyncSteps) and isinstance(overlapped.engine.steps, OverlappedSteps)
    assert EngineConfig(device="cpu").overlaps_steps() is False
    assert EngineConfig(device="cuda").overlaps_steps() is True
    assert EngineConfig(device="cuda", async_scheduling=False).overlaps_steps() is False
    parser = build_parser()
    assert engine_kwargs(parser.parse_args(["generate", "--prompt", "x"]))["async_scheduling"] is None
    assert engine_kwargs(parser.parse_args(["generate", "--prompt", "x", "--async-scheduling"]))["async_scheduling"]
    no = parser.parse_args(["generate", "--prompt", "x", "--no-async-scheduling"])
    assert engine_kwargs(no)["async_scheduling"] is False


def test_greedy_and_seeded_outputs_equal_the_sync_loop(llms) -> None:
    sync, overlapped = llms
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    base = sync.generate(PROMPTS[1], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = base[3]  # a token the second prompt samples: that request stops late when overlapped
    params = [
        greedy,
        SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[stop_at]),
        SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=5, presence_penalty=0.5),
    ]
    expected = _outputs(sync, params)
    assert expected[1][1] == "stop" and expected[1][0][-1] == stop_at
    _assert_same(_outputs(overlapped, params), expected)
    assert not overlapped.engine.steps.in_flight and not overlapped.engine.has_unfinished_requests()


def test_grammar_and_prompt_logprob_steps_settle_at_once_and_match_the_sync_loop(llms) -> None:
    sync, overlapped = llms
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    params = [
        SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=Spec(json=json.dumps(schema))),
        SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=Spec(choice=["alpha", "beta"])),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
    ]

    def run(llm: LLM) -> list[tuple]:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason,
                 [sorted(entry) for entry in o.prompt_logprobs[1:]] if o.prompt_logprobs else None) for o in outs]

    expected = run(sync)
    assert sync.get_tokenizer().decode(expected[2][0]) in ("alpha", "beta") and expected[2][1] == "stop"
    assert expected[1][2] is not None and len(expected[1][2]) == len(sync.get_tokenizer().encode(PROMPTS[1])) - 1
    assert run(overlapped) == expected
    assert not overlapped.engine.structured_output._grammars


def test_a_live_session_on_the_model_gives_the_sync_turns(llms) -> None:
    def turns(llm: LLM, params: SamplingParams) -> list[list[int]]:
        engine, answers = llm.engine, []
        tokenizer = llm.get_tokenizer()
        engine.open_session("live", tokenizer.encode("1 2 3 4 5"), [])
        for text in (" 6 7", " 8 9"):
            engine.append_input("live", tokenizer.encode(text), [], [])
            engine.commit_turn("live", tokenizer.encode(" Answer:"), params, [])
            answer: list[int] = []
            finished = False
            while not finished:  # overlapped, the turn's end is seen one step late and its extra token dropped
                for out in engine.step():
                    answer += out.new_token_ids
                    finished = finished or out.finish_reason is not None
            answers.append(answer)
        answers.append(list(engine.session_tail("live")))
        engine.abort_requests(["live"])
        while engine.has_work():
            engine.step()
        return answers

    sync, overlapped = llms
    first = turns(sync, SamplingParams(temperature=0.0, max_tokens=4))[0]
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[first[2]])  # turn 1 ends by a stop token
    expected = turns(sync, params)
    assert expected[0] == first[: first.index(first[2]) + 1] and len(set(expected[1])) > 1
    assert turns(overlapped, params) == expected


def test_tensor_parallel_ranks_follow_the_overlapped_launches(llms) -> None:
    sync, _ = llms
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    expected = [tokens for tokens, *_ in _outputs(sync, [params] * len(PROMPTS))]
    with LLM(dtype="float32", num_kv_blocks=64, tensor_parallel_size=2, distributed_timeout_s=20,
             async_scheduling=True) as tp2:
        assert isinstance(tp2.engine.steps, OverlappedSteps)
        assert [tokens for tokens, *_ in _outputs(tp2, [params] * len(PROMPTS))] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_overlapped_steps_on_cuda_give_the_sync_tokens() -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=16, ignore_eos=True, logprobs=2)
    params = [greedy, seeded, greedy, seeded]
    with LLM(dtype="float32", num_kv_blocks=64, device="cuda", async_scheduling=False) as sync:
        expected = _outputs(sync, params)
    with LLM(dtype="float32", num_kv_blocks=64, device="cuda") as overlapped:  # the default on CUDA
        assert isinstance(overlapped.engine.steps, OverlappedSteps)
        _assert_same(_outputs(overlapped, params), expected)
