"""The code predictor's fixed-shape block (fused weights, static buffers, every step's draw keys at once) draws
the same codebooks as `CodePredictor.predict` with `CodePredictorSampler`, its slow twin, for sampled and greedy
rows in one batch, whatever batch ran on its buffers before; the residual embedding agrees within 1e-5."""

from __future__ import annotations

import pytest
import torch

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.speech_loader import load_speech_models
from omnistream.engine.worker.code_predictor_block import CodePredictorBlock
from omnistream.engine.worker.speech_sampler import CodePredictorSampler, SpeechDraws

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor():
    return load_speech_models(default_model_path()).talker.code_predictor


def inputs(predictor, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, SpeechDraws]:
    generator = torch.Generator().manual_seed(seed)
    size = predictor.config.hidden_size
    hidden = torch.randn(batch, size, generator=generator)
    c0 = torch.randn(batch, size, generator=generator)
    draws = SpeechDraws(
        seeds=torch.randint(0, 2**62, (batch,), generator=generator),
        frames=torch.randint(0, 4000, (batch,), generator=generator),
        do_sample=torch.arange(batch) % 3 != 1,
    )
    return hidden, c0, draws


@pytest.mark.parametrize("batches", [[5, 3], [1, 8, 2]])
def test_the_block_draws_the_codes_of_the_step_by_step_predictor(predictor, batches):
    block = CodePredictorBlock(predictor, max_batch=8)
    for seed, batch in enumerate(batches):
        hidden, c0, draws = inputs(predictor, batch, seed)
        with torch.inference_mode():
            expected = predictor.predict(hidden, c0, CodePredictorSampler(draws))
        got = block(hidden, c0, draws)
        assert torch.equal(got.codes, expected.codes)
        assert (got.residual_embeds - expected.residual_embeds).abs().max() <= 1e-5
        assert len(set(expected.codes[0].tolist())) > 1  # the draws differ from step to step


def test_rows_that_all_sample_may_skip_the_argmax(predictor):
    block = CodePredictorBlock(predictor, max_batch=4)
    hidden, c0, draws = inputs(predictor, 4, 9)
    draws = draws._replace(do_sample=torch.ones(4, dtype=torch.bool))
    with torch.inference_mode():
        expected = predictor.predict(hidden, c0, CodePredictorSampler(draws))
    assert torch.equal(block(hidden, c0, draws, any_greedy=False).codes, expected.codes)


def test_a_batch_beyond_the_block_is_refused(predictor):
    block = CodePredictorBlock(predictor, max_batch=2)
    with pytest.raises(ValueError, match="holds 2 rows"):
        block(*inputs(predictor, 3, 0))
