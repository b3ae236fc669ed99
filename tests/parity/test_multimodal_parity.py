"""End-to-end multimodal parity: LLM.generate with audio, images, videos (with and without their sound)
against HF generate on the same random-weight thinker, fed the same preprocessed inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream import LLM, SamplingParams
from omnistream.multimodal.tensor_codec import from_tensor_data
from tests.multimodal.media import encode_video
from tests.parity.hf_oracle import (
    TINY,
    build_hf_thinker,
    encoder_variant_config,
    save_servable,
)

FP32_TOL = 1e-4
NEW_TOKENS = 16
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def _speech(seconds: float, seed: int) -> tuple[np.ndarray, int]:
    """A length that is a multiple of 160 samples (doc §10.5), a chirp plus noise."""
    n = int(seconds * 16000) // 160 * 160
    t = np.arange(n) / 16000
    rng = np.random.default_rng(seed)
    wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(n)
    return wave.astype(np.float32), 16000


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # multiples of 32: no resize


def _frames(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)


CASES = {
    "audio": lambda: (_chat(AUDIO + "What is said?"), {"audio": _speech(2.5, 0)}, {}),
    "image": lambda: (_chat(IMAGE + "Describe."), {"image": _image(64, 96, 1)}, {}),
    "video": lambda: (_chat(VIDEO + "What happens?"), {"video": (_frames(4, 2), 2.0)}, {}),
    "video_audio_spg1": lambda: (_chat(VIDEO + "Listen."), {"video": encode_video(2.0, fps=10)}, {"fps": 2.0}),
    "video_audio_spg2": lambda: (_chat(VIDEO + "Listen."), {"video": encode_video(4.0, fps=5)}, {"fps": 1.0}),
    "mixed": lambda: (
        _chat("Hear " + AUDIO + " and see " + IMAGE + " then answer."),
        {"audio": _speech(9.3, 3), "image": _image(64, 64, 4)},
        {"audio_window_s": 8},
    ),
}


@pytest.fixture(scope="module", params=["tiny", "variant"])
def pair(request, tmp_path_factory):
    cfg = TINY if request.param == "tiny" else encoder_variant_config()
    hf = build_hf_thinker(cfg, seed=5)
    path = save_servable(hf, tmp_path_factory.mktemp(request.param))
    return hf, LLM(path, dtype="float32", num_kv_blocks=256, max_num_batched_tokens=64)


def _hf_inputs(processed) -> dict:
    """HF keyword inputs rebuilt from our processed prompt (the preprocessors have their own parity tests).
    Audio windows of one clip share an identifier prefix; clips and soundtracks go in sequence order."""
    ids = torch.tensor([processed.token_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    clips: dict[str, list[torch.Tensor]] = {}
    pixels, grids, vpixels, vgrids = [], [], [], []
    for feature in processed.mm_features:
        data = {k: from_tensor_data(v) for k, v in feature.inputs.items()}
        if feature.modality == "audio":
            clips.setdefault(feature.identifier.rsplit(":", 1)[0], []).append(data["input_features"])
        elif feature.modality == "image":
            pixels.append(data["pixel_values"])
            grids.append(data["grid_thw"])
        else:
            vpixels.append(data["pixel_values"])
            vgrids.append(data["grid_thw"])
            if feature.modality == "video_audio":
                clips[feature.identifier] = [data["input_features"]]
    mels = [torch.cat(windows, dim=1) for windows in clips.values()]
    if mels:
        longest = max(m.shape[1] for m in mels)
        inputs["input_features"] = torch.stack([torch.nn.functional.pad(m, (0, longest - m.shape[1])) for m in mels])
        mask = torch.zeros(len(mels), longest, dtype=torch.long)
        for i, m in enumerate(mels):
            mask[i, : m.shape[1]] = 1
        inputs["feature_attention_mask"] = mask
    if pixels:
        inputs["pixel_values"], inputs["image_grid_thw"] = torch.cat(pixels), torch.cat(grids)
    if vpixels:
        inputs["pixel_values_videos"], inputs["video_grid_thw"] = torch.cat(vpixels), torch.cat(vgrids)
        inputs["use_audio_in_video"] = any(f.modality == "video_audio" for f in processed.mm_features)
    return inputs


@pytest.mark.parametrize("case", sorted(CASES))
def test_multimodal_greedy_and_logprobs_match_hf(pair, case):
    hf, llm = pair
    prompt, media, kwargs = CASES[case]()
    processed = llm.input_processor.process(prompt, None, media, dict(kwargs))
    hf_inputs = _hf_inputs(processed)
    if "pixel_values_videos" in hf_inputs:
        second_per_grid = 2.0 / kwargs.get("fps", 2.0)
        hf_inputs["video_second_per_grid"] = torch.tensor([second_per_grid])
    with torch.no_grad():
        ref = hf.generate(
            **hf_inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=151643,
        )
    ref_tokens = ref.sequences[0, len(processed.token_ids):].tolist()
    ref_logprobs = torch.stack(ref.logits, dim=1)[0].float().log_softmax(-1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)
    out = llm.generate({"prompt": prompt, "multi_modal_data": media, "mm_processor_kwargs": kwargs}, params,
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == processed.token_ids
    assert out.outputs[0].token_ids == ref_tokens
    for i, (token, position) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert abs(position[token].logprob - float(ref_logprobs[i, token])) < FP32_TOL
