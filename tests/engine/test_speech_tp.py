"""The speech lane under tensor parallelism (2 gloo ranks on CPU; the tiny stack with the speech oracle's O(1)
weights, so the talker is sensitive to every input row): rank 0 runs it whole and the other rank never sees its
work, and spoken answers (text, audio and video prompts, greedy and seeded codes) have the same tokens and the same
[16 x n] codes as at TP=1, and PCM16 within one step of it."""

from __future__ import annotations

import numpy as np
import pytest

from omnistream import LLM, SamplingParams
from omnistream.engine.model_executor.distributed import get_tp_world_size
from omnistream.scheduler.sampling_params import SpeechParams
from tests.parity.speech_oracle import build_hf_omni, save_hf_omni

FRAMES = 6
ENGINE = {
    "dtype": "float32",
    "num_kv_blocks": 128,
    "max_num_batched_tokens": 64,
    "distributed_timeout_s": 30,
    "max_audio_frames": FRAMES,
}


def _chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def _speech(seconds: float) -> tuple[np.ndarray, int]:
    t = np.arange(int(seconds * 16000) // 160 * 160) / 16000
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32), 16000


PROMPTS = [
    _chat("Say something nice."),
    {
        "prompt": _chat("<|audio_start|><|audio_pad|><|audio_end|>What is said?"),
        "multi_modal_data": {"audio": _speech(2.0)},
    },
    {
        "prompt": _chat("<|vision_start|><|video_pad|><|vision_end|>What happens?"),
        "multi_modal_data": {"video": (np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), 2.0)},
    },
]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, speech=SpeechParams(do_sample=False)),
    SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, seed=3, speech=SpeechParams(voice="chelsie")),
]


def _spoken(llm: LLM) -> tuple[list, dict[str, list[list[int]]]]:
    """Every prompt with every params, and the frames rank 0's speech lane sampled, by request."""
    speech = llm.engine.executor.runner.speech
    execute, codes = speech.execute, {}

    def record(schedule):
        frames = execute(schedule)
        for frame in frames:
            codes.setdefault(frame.req_id, []).extend([frame.codes] if frame.codes else [])
        return frames

    speech.execute = record
    try:
        outputs = [llm.generate(PROMPTS, params, use_tqdm=False) for params in PARAMS]
    finally:
        speech.execute = execute
    return [o for batch in outputs for o in batch], codes


def _pcm(audio: bytes) -> np.ndarray:
    return np.frombuffer(audio, dtype="<i2").astype(np.int64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(save_hf_omni(build_hf_omni(seed=3), tmp_path_factory.mktemp("omni")))


@pytest.fixture(scope="module")
def tp1(checkpoint):
    with LLM(checkpoint, **ENGINE) as llm:
        yield _spoken(llm)


def test_two_ranks_speak_exactly_as_one(checkpoint, tp1):
    want, want_codes = tp1
    with LLM(checkpoint, **ENGINE, tensor_parallel_size=2) as llm:
        assert llm.engine.executor.speech_config is not None and llm.engine.executor.runner.speech is not None
        got, got_codes = _spoken(llm)
    assert get_tp_world_size() == 1
    for a, b in zip(want, got, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert len(b.outputs[0].audio) == 2 * (FRAMES * 1920 - 555)
        # the same codes decode to the same audio up to one PCM16 step: the ranks run on fewer CPU threads
        assert np.abs(_pcm(b.outputs[0].audio) - _pcm(a.outputs[0].audio)).max() <= 1
    assert len({bytes(o.outputs[0].audio) for o in want}) == len(want)  # six different answers
    by_order = [want_codes[o.request_id] for o in want], [got_codes[o.request_id] for o in got]
    assert by_order[0] == by_order[1] and all(len(c) == FRAMES for c in by_order[0])
