"""Tensor parallelism through LLM on CPU (2 gloo ranks): TP=2 == TP=1, sharded loading, dead workers end the engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from omnistream import LLM, SamplingParams
from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.errors import EngineDeadError
from omnistream.engine.model_executor.distributed import get_tp_world_size
from omnistream.engine.model_executor.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
)
from omnistream.engine.model_executor.loader import CheckpointSlice
from tests.processes import gone_within, running

FP32_TOL = 1e-4
# 64 batched tokens: the long prompt prefills in chunks; a short timeout so a bug fails fast instead of hanging
ENGINE = dict(dtype="float32", num_kv_blocks=64, max_num_batched_tokens=64, distributed_timeout_s=20)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=1)
TEXT_PROMPTS = ["Hello world", "The capital of France is", "one two three " * 30]


def _chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def _speech(seconds: float) -> tuple[np.ndarray, int]:
    t = np.arange(int(seconds * 16000) // 160 * 160) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32), 16000


MEDIA_PROMPTS = [
    {"prompt": _chat("<|audio_start|><|audio_pad|><|audio_end|>What is said?"), "multi_modal_data": {
        "audio": _speech(2.5)}},
    {"prompt": _chat("<|vision_start|><|image_pad|><|vision_end|>Describe."), "multi_modal_data": {
        "image": np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)}},
    {"prompt": _chat("<|vision_start|><|video_pad|><|vision_end|>What happens?"), "multi_modal_data": {
        "video": (np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), 2.0)}},
]


def assert_same_generations(want: list, got: list) -> None:
    for a, b in zip(want, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert pa.keys() == pb.keys()
            assert all(abs(pa[t].logprob - pb[t].logprob) < FP32_TOL for t in pa)
        for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert all(abs(pa[t].logprob - pb[t].logprob) < FP32_TOL for t in pa)


def param_bytes(model: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.fixture(scope="module")
def tp1():
    with LLM(**ENGINE) as llm:
        yield llm


@pytest.fixture(scope="class")
def tp2():
    """Class-scoped: a process holds one TP engine at a time, and the later tests start their own."""
    CheckpointSlice.bytes_read = 0
    with LLM(**ENGINE, tensor_parallel_size=2) as llm:
        llm.bytes_read = CheckpointSlice.bytes_read
        yield llm
    assert get_tp_world_size() == 1 and not torch.distributed.is_initialized()


class TestTwoRanks:
    def test_text_generations_match_tp1(self, tp1, tp2):
        assert_same_generations(tp1.generate(TEXT_PROMPTS, GREEDY, use_tqdm=False),
                                tp2.generate(TEXT_PROMPTS, GREEDY, use_tqdm=False))

    def test_audio_image_video_generations_match_tp1(self, tp1, tp2):
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
        want = tp1.generate(MEDIA_PROMPTS, params, use_tqdm=False)
        got = tp2.generate(MEDIA_PROMPTS, params, use_tqdm=False)
        for a, b in zip(want, got):
            assert b.outputs[0].token_ids == a.outputs[0].token_ids
            for pa, pb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert all(abs(pa[t].logprob - pb[t].logprob) < FP32_TOL for t in pa)

    def test_each_rank_holds_and_reads_half_of_the_sharded_weights(self, tp1, tp2):
        full, shard = tp1.engine.model, tp2.engine.model
        for part in ("model.embed_tokens", "lm_head", "model.layers", "audio_tower.layers", "visual.blocks"):
            assert param_bytes(shard, part) == pytest.approx(param_bytes(full, part) / 2, rel=0.02), part
        assert param_bytes(shard) < 0.52 * param_bytes(full)
        speech = tp2.engine.executor.runner.speech  # rank 0 also reads the speech lane's models, whole (v1)
        lane = param_bytes(speech.talker) + param_bytes(speech.code2wav)
        assert tp2.bytes_read == param_bytes(shard) + lane  # each rank reads exactly its shard from disk
        assert shard.num_kv_heads == full.num_kv_heads // 2
        assert tp2.engine.executor.runner.kv_caches[0].shape[3] == full.num_kv_heads // 2


def test_audio_tower_is_replicated_when_its_heads_do_not_divide_tp(tmp_path):
    """One audio head at TP=2: the tower is whole on every rank, and audio prompts still match TP=1."""
    shutil.copytree(default_model_path(), tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["thinker_config"]["audio_config"]["encoder_attention_heads"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)
    with LLM(str(tmp_path), **ENGINE) as llm:
        want = llm.generate(MEDIA_PROMPTS[0], params, use_tqdm=False)
        full_tower = param_bytes(llm.engine.model, "audio_tower")
    with LLM(str(tmp_path), **ENGINE, tensor_parallel_size=2) as llm:
        tower = llm.engine.model.audio_tower
        assert param_bytes(tower) == full_tower
        assert not any(isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in tower.modules())
        assert tower.layers[0].self_attn.num_heads == 1
        got = llm.generate(MEDIA_PROMPTS[0], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_a_killed_worker_ends_the_engine_with_a_clear_error():
    llm = LLM(**ENGINE, tensor_parallel_size=2)
    worker = llm.engine.executor.procs[0]
    steps = 0
    step = llm.engine.step

    def step_then_kill():
        nonlocal steps
        steps += 1
        if steps == 3:
            os.kill(worker.pid, signal.SIGKILL)
        return step()

    llm.engine.step = step_then_kill
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 1 \(killed by SIGKILL\)"):
        llm.generate("Hello world", SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - start < 10
    with pytest.raises(EngineDeadError):  # dead stays dead, without waiting
        llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)
    llm.shutdown()
    assert not running(worker.pid)
    assert get_tp_world_size() == 1 and not torch.distributed.is_initialized()


def test_workers_exit_when_the_engine_process_dies():
    script = ("import os, signal; from omnistream import LLM; "
              "llm = LLM(dtype='float32', num_kv_blocks=8, tensor_parallel_size=2); "
              "print(llm.engine.executor.procs[0].pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    engine = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert engine.returncode == -signal.SIGKILL, engine.stderr
    worker = int(engine.stdout.split()[-1])
    assert gone_within(worker, 10)
