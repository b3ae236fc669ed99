"""End-to-end parity through the engine (LLM: paged KV, continuous batching, sampler) against HF generate."""

from __future__ import annotations

import pytest
import torch

from omnistream import LLM, SamplingParams
from tests.parity.hf_oracle import TINY, build_hf_thinker, head_dim_128_config, save_servable

FP32_TOL = 1e-4
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["tiny", "head_dim_128"])
def pair(request, tmp_path_factory):
    """(HF thinker, our LLM over its thinker-only save)."""
    cfg = TINY if request.param == "tiny" else head_dim_128_config()
    hf = build_hf_thinker(cfg, seed=3)
    path = save_servable(hf, tmp_path_factory.mktemp(request.param))
    return hf, LLM(path, dtype="float32", num_kv_blocks=128, max_num_batched_tokens=48)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 151643, (n,), generator=gen).tolist() for n in (5, 37, 90)]


@torch.no_grad()
def _hf_greedy(hf, prompt: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    ids = torch.tensor([prompt])
    out = hf.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=151643,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    step_logprobs = torch.stack(out.logits, dim=1)[0].float().log_softmax(-1)  # [NEW_TOKENS, V]
    prompt_logprobs = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().log_softmax(-1)
    return tokens, step_logprobs, prompt_logprobs


def test_greedy_continuations_and_logprobs_match_hf(pair):
    hf, llm = pair
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    # all prompts in one batch, with prefills chunked at 48 tokens: the engine's normal path
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens, step_lp, prompt_lp = _hf_greedy(hf, prompt)
        completion = out.outputs[0]
        assert completion.token_ids == tokens
        for i, (token, position) in enumerate(zip(completion.token_ids, completion.logprobs)):
            top = step_lp[i].topk(5)
            assert abs(position[token].logprob - float(step_lp[i, token])) < FP32_TOL
            for tid, lp in zip(top.indices.tolist(), top.values.tolist()):
                assert abs(position[tid].logprob - lp) < FP32_TOL
        assert out.prompt_logprobs[0] is None
        for p, position in enumerate(out.prompt_logprobs[1:]):
            token = prompt[p + 1]
            assert abs(position[token].logprob - float(prompt_lp[p, token])) < FP32_TOL
            # ranks deep in the distribution may swap tokens whose logprobs differ by < FP32_TOL
            lowest = int((prompt_lp[p] > prompt_lp[p, token] + FP32_TOL).sum()) + 1
            highest = int((prompt_lp[p] > prompt_lp[p, token] - FP32_TOL).sum()) + 1
            assert lowest <= position[token].rank <= highest
