"""The code predictor's graphs: one per bucket of voices, recorded largest first after one warm-up each; a
replay of any batch (padded to its bucket) gives the eager block's codes; graphs are off on CPU and with
enforce_eager; the speech lane speaks the same through them. On CPU a stand-in capture reruns the block on the
static buffers; the real CUDA test is marked gpu."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from omnistream import LLM, SamplingParams
from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.speech_loader import load_speech_models
from omnistream.engine.worker.code_predictor_block import CodePredictorBlock
from omnistream.engine.worker.code_predictor_graphs import CodePredictorGraphs, code_predictor_graphs_off_reason
from omnistream.engine.worker.cuda_graphs import CudaGraphCapture
from omnistream.engine.worker.speech_sampler import SpeechDraws
from omnistream.scheduler.sampling_params import SpeechParams

MAX_VOICES = 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingBlock(CodePredictorBlock):
    """The block, logging the batch size of every call."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.calls: list[int] = []

    def __call__(self, hidden, c0_embeds, draws):
        self.calls.append(hidden.shape[0])
        return super().__call__(hidden, c0_embeds, draws)


class StandInCapture:
    """Records nothing: a 'graph' whose replay reruns the step; logs the block calls made before each capture."""

    def __init__(self, block: CountingBlock) -> None:
        self.block, self.calls_at_capture = block, []

    def __call__(self, step: Callable[[], None]):
        self.calls_at_capture.append(list(self.block.calls))
        return type("StandInGraph", (), {"replay": staticmethod(step)})()


def predictor(device: str = "cpu"):
    return load_speech_models(default_model_path(), device=torch.device(device)).talker.code_predictor


def inputs(batch: int, size: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, SpeechDraws]:
    generator = torch.Generator().manual_seed(seed)
    draws = SpeechDraws(
        seeds=torch.randint(0, 2**62, (batch,), generator=generator).to(device),
        frames=torch.randint(0, 4000, (batch,), generator=generator).to(device),
        do_sample=(torch.arange(batch) % 4 != 2).to(device),
    )
    hidden = torch.randn(batch, size, generator=generator).to(device)
    return hidden, torch.randn(batch, size, generator=generator).to(device), draws


def test_buckets_are_recorded_largest_first_after_one_warm_up_each():
    block = CountingBlock(predictor(), MAX_VOICES)
    capture = StandInCapture(block)
    graphs = CodePredictorGraphs(block, capture)
    graphs.capture_all()
    assert graphs.sizes == [1, 2, 4, 6]
    assert capture.calls_at_capture == [[6], [6, 4], [6, 4, 2], [6, 4, 2, 1]]


def test_stand_in_replays_give_the_eager_codes_for_every_batch():
    model = predictor()
    eager = CodePredictorBlock(model, MAX_VOICES)
    block = CountingBlock(model, MAX_VOICES)
    graphs = CodePredictorGraphs(block, StandInCapture(block))
    graphs.capture_all()
    for seed, batch in enumerate([3, 1, 5, 6, 2]):
        args = inputs(batch, model.config.hidden_size, seed)
        expected, got = eager(*args), graphs(*args)
        assert block.calls[-1] == {1: 1, 2: 2, 3: 4, 5: 6, 6: 6}[batch]  # the bucket ran, padded
        assert torch.equal(got.codes, expected.codes)
        assert torch.allclose(got.residual_embeds, expected.residual_embeds, atol=1e-6)


def test_graphs_are_off_on_cpu_and_with_enforce_eager():
    assert code_predictor_graphs_off_reason(torch.device("cuda"), enforce_eager=False) is None
    assert "enforce_eager" in code_predictor_graphs_off_reason(torch.device("cuda"), enforce_eager=True)
    assert "cpu" in code_predictor_graphs_off_reason(torch.device("cpu"), enforce_eager=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_graphs_give_the_eager_codes_without_host_syncs():
    model = predictor("cuda")
    eager = CodePredictorBlock(model, MAX_VOICES)
    graphs = CodePredictorGraphs(CodePredictorBlock(model, MAX_VOICES), CudaGraphCapture())
    graphs.capture_all()
    for seed, batch in enumerate([3, 1, 6, 5]):
        args = inputs(batch, model.config.hidden_size, seed, "cuda")
        expected = eager(*args)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = graphs(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(got.codes, expected.codes)
        assert torch.allclose(got.residual_embeds, expected.residual_embeds, atol=1e-5)


def test_the_speech_lane_speaks_the_same_through_stand_in_graphs():
    def speak(llm: LLM) -> list[bytes]:
        conversations = [[{"role": "user", "content": q}] for q in ("Hi!", "Tell me a story.")]
        params = [SamplingParams(temperature=0.8, max_tokens=4, seed=s, speech=SpeechParams()) for s in (1, 2)]
        return [o.outputs[0].audio for o in llm.chat(conversations, params, use_tqdm=False)]

    with LLM(max_audio_frames=6, max_num_voices=3) as llm:
        eager = speak(llm)
        runner = llm.engine.executor.runner.speech
        block = CountingBlock(runner.talker.code_predictor, 3)
        runner.code_predictor = CodePredictorGraphs(block, StandInCapture(block))
        runner.code_predictor.capture_all()
        block.calls.clear()
        graphed = speak(llm)
    assert graphed == eager and all(len(audio) == 2 * (6 * 1920 - 555) for audio in eager)
    assert set(block.calls) == {2}  # every frame of both voices replayed the bucket of 2
