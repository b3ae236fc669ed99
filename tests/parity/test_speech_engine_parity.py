"""The speech lane end to end against HF transformers (fp32, tiny random stack saved with save_pretrained):
greedy thinker tokens and greedy [16 x n] codes identical to one HF `generate` call per request, for text
prompts and prompts with audio or an image in a user turn (the talker reads the thinker's hidden rows there,
and an image's 3-D M-RoPE positions in the talker's own sequence), with
replies that stop on a stop token (HF's thinker_eos_token_id), and the streamed PCM16 equal to the
whole-sequence code2wav decode of those codes (HF's and ours) to one quantization step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from omnistream import LLM, SamplingParams
from omnistream.multimodal.tensor_codec import from_tensor_data
from omnistream.scheduler.sampling_params import SpeechParams
from tests.multimodal.media import encode_video
from tests.parity.speech_oracle import build_hf_omni, save_hf_omni

MAX_FRAMES = 24
MODALITIES = ("audio", "image", "video", "video_audio")
VIDEOS = ["video", "video_audio"]
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _chat(*turns: tuple[str, str]) -> str:
    body = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)
    return body + "<|im_start|>assistant\n"


def _speech(seconds: float) -> tuple[np.ndarray, int]:
    t = np.arange(int(seconds * 16000) // 160 * 160) / 16000
    noise = 0.05 * np.random.default_rng(0).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + noise).astype(np.float32), 16000


CASES = {  # prompt, multi_modal_data, mm_processor_kwargs
    "system_and_user": (_chat(("system", "Be brief."), ("user", "Say hello to the world.")), {}, {}),
    "user": (_chat(("user", "What is two plus two?")), {}, {}),
    "user_audio": (_chat(("user", AUDIO + "What is said?")), {"audio": _speech(2.0)}, {}),
    "two_turns_then_image": (
        _chat(
            ("system", "Be kind."),
            ("user", "Hi there."),
            ("assistant", "Hello!"),
            ("user", "And " + IMAGE + "?"),
        ),
        {"image": np.random.default_rng(2).integers(0, 256, (32, 64, 3), dtype=np.uint8)},
        {},
    ),
    "user_image": (
        _chat(("system", "Look."), ("user", "See " + IMAGE + " and say.")),
        {"image": np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)},
        {},
    ),
    "audio_then_image": (
        _chat(("user", "Hear " + AUDIO + " then see " + IMAGE + ".")),
        {"audio": _speech(1.5), "image": np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)},
        {},
    ),
    "user_video": (
        _chat(("system", "Watch."), ("user", "What happens in " + VIDEO + "?")),
        {"video": (np.random.default_rng(3).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8), 1.0)},
        {"fps": 1.0},
    ),
    "user_video_with_audio": (
        _chat(("user", "Hi."), ("assistant", "Hello!"), ("user", VIDEO + "What is heard and seen?")),
        {"video": encode_video(4.0, fps=5)},
        {"fps": 1.0},
    ),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    hf = build_hf_omni(seed=7)
    path = save_hf_omni(hf, tmp_path_factory.mktemp("omni"))
    llm = LLM(str(path), dtype="float32", max_audio_frames=MAX_FRAMES, max_num_voices=2)
    yield hf, llm
    llm.shutdown()


def _hf_inputs(processed) -> dict:
    """HF's inputs for our processed prompt: ids, the audio windows of its one clip (or its one video's
    soundtrack) joined, its images, its video with the seconds per grid our processor chose."""
    ids = torch.tensor([processed.token_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    by_modality = {m: [f for f in processed.mm_features if f.modality == m] for m in MODALITIES}
    mels = [from_tensor_data(f.inputs["input_features"]) for f in by_modality["audio"] + by_modality["video_audio"]]
    for kind, prefix, modalities in (("pixel_values", "image", ["image"]), ("pixel_values_videos", "video", VIDEOS)):
        items = [f for m in modalities for f in by_modality[m]]
        if items:
            inputs[kind] = torch.cat([from_tensor_data(f.inputs["pixel_values"]) for f in items])
            inputs[f"{prefix}_grid_thw"] = torch.cat([from_tensor_data(f.inputs["grid_thw"]) for f in items])
    videos = [f for m in VIDEOS for f in by_modality[m]]
    if videos:
        inputs["video_second_per_grid"] = torch.tensor([f.options["second_per_grid"] for f in videos])
        inputs["use_audio_in_video"] = bool(by_modality["video_audio"])
    if mels:
        mel = torch.cat(mels, dim=1)
        inputs["input_features"] = mel[None]
        inputs["feature_attention_mask"] = torch.ones(1, mel.shape[1], dtype=torch.long)
    return inputs


def _stop_token(llm: LLM, prompt: dict) -> int:
    """A token the greedy reply samples at step >= 2 that it has not sampled before: the reply's stop token."""
    reply = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    tokens = reply.outputs[0].token_ids
    return next(t for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])


def _pcm16(wav: torch.Tensor) -> np.ndarray:
    return (wav.double().clamp(-1, 1) * 32767).round().to(torch.int64).numpy()


@contextmanager
def _talker_places_audio_beside_vision(hf, inputs: dict) -> Iterator[dict]:
    """What HF's talker lacks for audio beside an image or a video (a video's own soundtrack included): its
    `get_rope_index` sizes audio with `config.audio_config.n_window`, but the talker config has no audio_config
    (AttributeError), so it gets the thinker's; and `generate` never hands use_audio_in_video to the talker (it
    would read <|vision_start|><|audio_start|> as a lone audio clip and the rest as text): it goes as talker_*."""
    if "feature_attention_mask" not in inputs or not {"image_grid_thw", "video_grid_thw"} & inputs.keys():
        yield {}
        return
    hf.talker.config.audio_config = hf.config.thinker_config.audio_config
    try:
        yield {"talker_use_audio_in_video": True} if inputs.get("use_audio_in_video") else {}
    finally:
        del hf.talker.config.audio_config


@torch.no_grad()
def _hf_generate(hf, inputs: dict, stop: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    captured = []
    decode = hf.code2wav.chunked_decode

    def capture(codes, **kwargs):
        captured.append(codes)
        return decode(codes, **kwargs)

    hf.code2wav.chunked_decode = capture
    try:
        with _talker_places_audio_beside_vision(hf, inputs) as talker_kwargs:
            sequences, wav = hf.generate(
                **inputs,
                **talker_kwargs,
                speaker="Chelsie",
                thinker_max_new_tokens=8,
                thinker_eos_token_id=stop,
                thinker_do_sample=False,
                talker_do_sample=False,
                talker_max_new_tokens=MAX_FRAMES + 1,
            )
    finally:
        hf.code2wav.chunked_decode = decode
    return sequences[0, inputs["input_ids"].shape[1] :].tolist(), captured[0][0], wav.reshape(-1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_codes_and_audio_equal_hf_generate(stack, case):
    hf, llm = stack
    text, media, kwargs = CASES[case]
    prompt = {"prompt": text, "multi_modal_data": media, "mm_processor_kwargs": kwargs}
    stop = _stop_token(llm, prompt)
    params = SamplingParams(
        temperature=0,
        max_tokens=8,
        stop_token_ids=[stop],
        speech=SpeechParams(voice="chelsie", do_sample=False),
    )
    speech = llm.engine.executor.runner.speech
    execute, frames_sent = speech.execute, []

    def record(schedule):
        frames = execute(schedule)
        frames_sent.extend(frame.codes for frame in frames if frame.codes)
        return frames

    speech.execute = record
    try:
        output = llm.generate(prompt, params, use_tqdm=False)[0]
    finally:
        speech.execute = execute
    ours = output.outputs[0]
    hf_tokens, hf_codes, hf_wav = _hf_generate(
        hf, _hf_inputs(llm.input_processor.process(text, None, media, dict(kwargs))), stop
    )
    assert ours.token_ids == hf_tokens and ours.finish_reason == "stop"
    assert torch.equal(torch.tensor(frames_sent).T, hf_codes)
    pcm = np.frombuffer(ours.audio, dtype="<i2").astype(np.int64)
    frames = hf_codes.shape[1]
    assert frames >= 4 and len(pcm) == frames * 1920 - 555
    assert ours.audio_finish_reason == ("length" if frames == MAX_FRAMES else "stop")
    assert np.abs(pcm - _pcm16(hf_wav)).max() <= 1
    assert np.abs(pcm).max() > 1000  # the calibrated vocoder is neither silent nor a comparison of zeros
    ours_full = speech.code2wav(hf_codes.unsqueeze(0)).reshape(-1)
    assert np.abs(pcm - _pcm16(ours_full)).max() <= 1
