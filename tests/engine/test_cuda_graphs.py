"""Decode steps replayed from graphs (engine/worker/cuda_graphs.py) equal eager steps: with a stand-in graph whose
replay reruns the eager forward on the padded static buffers, a runner gives the tokens of an unpadded eager
runner for decode batches of sizes between buckets, its padded rows write only the sink page (every other KV
entry equals the eager runner's), prefill and mixed steps bypass the graphs, buckets are the smallest that hold
the batch and are captured largest first after one warm-up each (refused when tensor-parallel ranks disagree on
them); `enforce_eager` reaches the runner from LLM(...) and from the CLI. On CUDA (skipped here) real graphs give the eager runner's tokens, and a replay (copies in,
padding, replay) never syncs with the host."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable

import pytest
import torch

from omnistream import LLM
from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.entrypoints.args import engine_kwargs
from omnistream.engine.entrypoints.cli import build_parser
from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.worker import cuda_graphs
from omnistream.engine.worker.cuda_graphs import (
    DecodeGraphs,
    bucket_for,
    capture_sizes,
    graphs_off_reason,
)
from omnistream.engine.worker.model_runner import ModelRunner
from omnistream.scheduler.outputs import SchedulerOutput
from omnistream.scheduler.request import Request
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig

BLOCK = 16
MAX_NUM_SEQS = 16
NUM_BLOCKS = 80
MAX_MODEL_LEN = 256


class StandInGraph:
    """A 'graph' whose replay reruns the recorded step eagerly, on the same static buffers."""

    def __init__(self, step: Callable[[], None], replays: list[StandInGraph]) -> None:
        self.step, self.replays = step, replays

    def replay(self) -> None:
        self.replays.append(self)
        self.step()


class StandInCapture:
    """Records nothing: hands out stand-in graphs and logs the forwards run before each capture."""

    def __init__(self, forwards: list[int]) -> None:
        self.forwards = forwards  # forward calls so far, appended to by the counting model
        self.forwards_at_capture: list[int] = []
        self.replays: list[StandInGraph] = []

    def __call__(self, step: Callable[[], None]) -> StandInGraph:
        self.forwards_at_capture.append(len(self.forwards))
        return StandInGraph(step, self.replays)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model(default_model_path(), "float32")[0]


def _runner(model: torch.nn.Module, device: str = "cpu", enforce_eager: bool = True) -> ModelRunner:
    return ModelRunner(model, num_kv_blocks=NUM_BLOCKS, block_size=BLOCK, dtype=torch.float32,
                       device=torch.device(device), eos_token_ids=[2], max_num_seqs=MAX_NUM_SEQS,
                       max_model_len=MAX_MODEL_LEN, enforce_eager=enforce_eager)


def _stand_in_graphs(runner: ModelRunner) -> tuple[DecodeGraphs, StandInCapture]:
    """Give an eager CPU runner decode graphs recorded by the stand-in capture; count the model's forwards."""
    forwards: list[int] = []
    runner.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    capture = StandInCapture(forwards)
    graphs = DecodeGraphs(runner.model, runner.kv_caches, sizes=capture_sizes(MAX_NUM_SEQS),
                          max_pages=runner.slots.block_table.shape[1], sink_page=runner.sink_page, capture=capture)
    graphs.capture_all()
    runner.decode_graphs = graphs
    return graphs, capture


def _is_decode_only(so: SchedulerOutput) -> bool:
    return all(count == 1 for count in so.num_scheduled_tokens.values()) and not so.scheduled_encoder_inputs


def _lockstep(eager: ModelRunner, graphed: ModelRunner, seed: int,
              check: Callable[[SchedulerOutput], None] | None = None) -> list[int]:
    """Serve random greedy requests (some arriving later, so mixed steps follow decodes) through both runners
    from one scheduler; assert equal tokens every step. Returns the batch size of each decode-only step."""
    rng = random.Random(seed)
    scheduler = Scheduler(SchedulerConfig(max_model_len=MAX_MODEL_LEN, num_kv_blocks=NUM_BLOCKS,
                                          max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=48, block_size=BLOCK,
                                          enable_prefix_caching=False))

    def add(name: str) -> None:
        prompt = [rng.randrange(100, 150000) for _ in range(rng.randint(2, 40))]
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(2, 24), ignore_eos=True)
        scheduler.add_request(Request(name, prompt, params, [2], arrival_time=0.0))

    for i in range(11):
        add(f"r{i}")
    decode_sizes, step = [], 0
    while scheduler.has_unfinished_requests():
        so = scheduler.schedule()
        want, got = eager.execute_model(so), graphed.execute_model(so)
        assert got.sampled_req_ids == want.sampled_req_ids
        assert got.sampled_token_ids == want.sampled_token_ids, f"step {step}"
        if _is_decode_only(so) and so.num_scheduled_tokens:
            decode_sizes.append(len(so.num_scheduled_tokens))
        if check is not None:
            check(so)
        scheduler.update_from_output(so, want)
        step += 1
        if step == 12:
            for i in range(11, 14):
                add(f"r{i}")
    return decode_sizes


def test_buckets_are_1_2_4_8_then_steps_of_8_to_256_then_16_capped_by_max_num_seqs() -> None:
    sizes = capture_sizes(600)
    assert sizes[:4] == [1, 2, 4, 8]
    steps = [b - a for a, b in itertools.pairwise(sizes)]
    assert set(steps[3:sizes.index(256)]) == {8} and set(steps[sizes.index(256):-1]) == {16}
    assert sizes[-2] < 600 == sizes[-1]  # the cap is itself a bucket
    assert capture_sizes(100)[-3:] == [88, 96, 100] and capture_sizes(3) == [1, 2, 3] and capture_sizes(1) == [1]
    for max_num_seqs in (1, 7, 16, 100, 300):
        sizes = capture_sizes(max_num_seqs)
        for n in range(1, max_num_seqs + 1):
            assert bucket_for(n, sizes) == min(s for s in sizes if s >= n)


def test_graphs_are_off_on_cpu_with_enforce_eager_and_with_an_attention_backend_that_reads_back() -> None:
    cuda = torch.device("cuda")
    assert graphs_off_reason(cuda, False, "triton") is None
    assert "enforce_eager" in graphs_off_reason(cuda, True, "triton")
    assert "CUDA only" in graphs_off_reason(torch.device("cpu"), False, "triton")
    assert "reference" in graphs_off_reason(cuda, False, "reference")


def test_capture_goes_largest_first_after_one_warm_up_each_and_writes_only_the_sink_page(model) -> None:
    runner = _runner(model)
    graphs, capture = _stand_in_graphs(runner)
    assert list(graphs.graphs) == sorted(capture_sizes(MAX_NUM_SEQS), reverse=True)
    assert capture.forwards_at_capture == list(range(1, len(graphs.graphs) + 1))  # one eager forward before each
    for cache in runner.kv_caches:
        assert not cache[:, : runner.sink_page].any()
        assert cache[:, runner.sink_page].any()  # the warm-ups wrote their padding there


def test_stand_in_graphs_give_the_eager_tokens_and_padding_writes_only_the_sink_page(model) -> None:
    eager, graphed = _runner(model), _runner(model)
    graphs, capture = _stand_in_graphs(graphed)
    sink = graphed.sink_page
    seen = [0]  # replays before this step

    def check(so: SchedulerOutput) -> None:
        for mine, theirs in zip(graphed.kv_caches, eager.kv_caches):  # eager wrote only the step's live slots
            torch.testing.assert_close(mine[:, :sink], theirs[:, :sink], rtol=1e-5, atol=1e-5)
        assert len(capture.replays) - seen[0] == int(_is_decode_only(so) and bool(so.num_scheduled_tokens))
        seen[0] = len(capture.replays)

    decode_sizes = _lockstep(eager, graphed, seed=3, check=check)
    sizes = capture_sizes(MAX_NUM_SEQS)
    between = [n for n in decode_sizes if n not in sizes]
    assert len(between) >= 3, decode_sizes  # batches padded up to a larger bucket were replayed
    size_of = {id(graph): size for size, graph in graphs.graphs.items()}
    assert [size_of[id(graph)] for graph in capture.replays] == [bucket_for(n, sizes) for n in decode_sizes]
    assert len(set(decode_sizes)) >= 5


def test_prefill_mixed_and_media_steps_are_not_served_by_graphs(model) -> None:
    graphs = DecodeGraphs(model, _runner(model).kv_caches, sizes=[1, 2, 4], max_pages=4, sink_page=NUM_BLOCKS,
                          capture=StandInCapture([]))
    decode = AttentionMetadata.build([1, 1, 1], [5, 9, 2], [[0], [1], [2]], BLOCK)
    mixed = AttentionMetadata.build([1, 3], [5, 9], [[0], [1]], BLOCK)
    too_many = AttentionMetadata.build([1] * 5, [3] * 5, [[i] for i in range(5)], BLOCK)
    assert graphs.serves(decode, None)
    assert not graphs.serves(mixed, None)
    assert not graphs.serves(decode, torch.zeros(3, model.config.text.hidden_size))  # media rows in the step
    assert not graphs.serves(too_many, None)


def test_enforce_eager_reaches_the_runner_from_llm_and_the_cli(caplog) -> None:
    args = build_parser().parse_args(["generate", "--prompt", "x", "--enforce-eager"])
    assert engine_kwargs(args)["enforce_eager"] is True
    assert engine_kwargs(build_parser().parse_args(["generate", "--prompt", "x"]))["enforce_eager"] is False
    with caplog.at_level(logging.INFO, logger=cuda_graphs.__name__):
        for enforce_eager, reason in ((True, "enforce_eager is set"), (False, "CUDA only")):
            caplog.clear()
            with LLM(dtype="float32", num_kv_blocks=8, enforce_eager=enforce_eager) as llm:
                assert llm.engine.executor.runner.decode_graphs is None
            assert any(reason in record.getMessage() for record in caplog.records)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_graphs_give_the_eager_tokens() -> None:
    model = load_model(default_model_path(), "float32", torch.device("cuda"), "triton")[0]
    eager, graphed = _runner(model, "cuda", enforce_eager=True), _runner(model, "cuda", enforce_eager=False)
    graphs = graphed.decode_graphs
    assert graphs is not None and next(iter(graphs.graphs)) == MAX_NUM_SEQS
    replay, replays = graphs.run, []

    def replay_without_host_syncs(*args: object) -> torch.Tensor:  # copies in, padding and replay never sync
        replays.append(1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return replay(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    graphs.run = replay_without_host_syncs
    decode_sizes = _lockstep(eager, graphed, seed=5)
    assert len(replays) == len(decode_sizes)
    assert len([n for n in decode_sizes if n not in capture_sizes(MAX_NUM_SEQS)]) >= 3


def test_capture_refuses_tensor_parallel_ranks_that_disagree_on_the_buckets(model, monkeypatch) -> None:
    runner = _runner(model)
    ranks = [torch.tensor([2, 2, 3]), torch.tensor([3, 3, 6])]  # (count, largest, sum): buckets [1, 2], [1, 2, 3]
    monkeypatch.setattr(cuda_graphs, "get_tp_world_size", lambda: 2)
    monkeypatch.setattr(cuda_graphs, "tensor_model_parallel_all_gather",
                        lambda mine, dim: torch.cat([mine, ranks.pop(0)], dim=dim))

    def graphs() -> DecodeGraphs:
        return DecodeGraphs(model, runner.kv_caches, sizes=[1, 2], max_pages=4, sink_page=runner.sink_page,
                            capture=StandInCapture([]))

    agreeing = graphs()
    agreeing.capture_all()  # the other rank has the same buckets
    assert list(agreeing.graphs) == [2, 1]
    with pytest.raises(RuntimeError, match="disagree on the CUDA graph buckets"):
        graphs().capture_all()
