"""Media through the offline LLM API on the embedded default model: long audio, malformed input, the encoder
cache and media-aware prefix caching, and chat content parts matching the equivalent generate call."""

from __future__ import annotations

import base64
import io

import numpy as np
import PIL.Image
import pytest

from omnistream import LLM, SamplingParams
from omnistream.multimodal.errors import EmptyMediaError, MediaDecodeError, MediaError, MediaLimitError
from omnistream.multimodal.placeholders import audio_token_count
from tests.multimodal.media import encode_audio, encode_video

AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)
# 15 min = 11 700 audio tokens, ~20 s on 2 CPU cores; the full 40 min (31 200) is benchmarks/long_audio.py.
LONG_AUDIO_MINUTES = 15


def _chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def _png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _speech(seconds: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """A low-amplitude tone plus noise at 16 kHz."""
    n = int(seconds * 16000)
    t = np.arange(n, dtype=np.float32) / 16000
    noise = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
    return (0.01 * np.sin(2 * np.pi * 440 * t) + 0.003 * noise).astype(np.float32), 16000


@pytest.fixture(scope="module")
def llm():
    """Images are limited to one per prompt; audio and video keep their default limits."""
    return LLM(dtype="float32", num_kv_blocks=1024, limit_mm_per_prompt={"image": 1})


def _generate(llm: LLM, prompts, params: SamplingParams = GREEDY):
    return llm.generate(prompts, params, use_tqdm=False)


def _assert_engine_healthy(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests()
    out = _generate(llm, "The capital of France is")[0]
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
    assert not llm.engine.has_unfinished_requests()


# ---- long audio -------------------------------------------------------------------------------


def test_long_audio_gets_every_placeholder_and_finishes(llm):
    wave = _speech(LONG_AUDIO_MINUTES * 60)
    prompt = _chat(AUDIO + "Summarize.")
    out = _generate(llm, {"prompt": prompt, "multi_modal_data": {"audio": wave}},
                    SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))[0]
    expected = audio_token_count(len(wave[0]) // 160)
    assert expected == 13 * 60 * LONG_AUDIO_MINUTES  # whole seconds: 13 tokens each, nothing truncated
    assert out.prompt_token_ids.count(llm.input_processor.token_ids.audio_pad) == expected
    assert len(out.prompt_token_ids) == len(llm.get_tokenizer().encode(prompt)) - 1 + expected
    assert out.finished and len(out.outputs[0].token_ids) == 2
    assert not llm.engine.has_unfinished_requests()


# ---- malformed media --------------------------------------------------------------------------

_MP3 = encode_audio("mp3", "libmp3lame", seconds=3.0)
_WAV = encode_audio("wav", "pcm_s16le", seconds=3.0)
_UNKNOWN_CODEC_WAV = _WAV[:20] + (0x7777).to_bytes(2, "little") + _WAV[22:]  # WAVE format tag no decoder knows

MALFORMED_AUDIO = {
    "truncated_mp3": (_MP3[: len(_MP3) // 2], MediaDecodeError, "truncated"),
    "truncated_wav": (_WAV[: len(_WAV) // 2], MediaDecodeError, "truncated"),
    "garbage": (b"this is not audio at all" * 100, MediaDecodeError, "cannot open"),
    "unknown_container": (b"OMNI" + bytes(range(256)) * 8, MediaDecodeError, "cannot open"),
    "unknown_codec": (_UNKNOWN_CODEC_WAV, MediaDecodeError, "audio"),
    "zero_length_array": ((np.zeros(0, np.float32), 16000), EmptyMediaError, "zero samples"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_AUDIO))
def test_malformed_audio_raises_typed_error_and_leaves_engine_usable(llm, case):
    source, error, message = MALFORMED_AUDIO[case]
    good = {"prompt": _chat(AUDIO + "What is said?"), "multi_modal_data": {"audio": _speech(1.0)}}
    bad = {"prompt": _chat(AUDIO + "What is said?"), "multi_modal_data": {"audio": source}}
    with pytest.raises(error, match=message):
        _generate(llm, [good, bad])  # the good prompt, already queued, is withdrawn
    _assert_engine_healthy(llm)


def test_one_pixel_image_is_accepted(llm):
    out = _generate(llm, {"prompt": _chat(IMAGE + "Describe."), "multi_modal_data": {"image": _png(1, 1, 0)}})[0]
    assert out.prompt_token_ids.count(llm.input_processor.token_ids.image_pad) >= 1
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens


def test_too_many_items_names_the_limit(llm):
    prompt = {"prompt": _chat(IMAGE + IMAGE + "Compare."), "multi_modal_data": {"image": [_png(32, 32, 1)] * 2}}
    with pytest.raises(MediaLimitError, match="image: items per prompt is 2, above the limit of 1") as info:
        _generate(llm, prompt)
    assert (info.value.modality, info.value.limit, info.value.maximum) == ("image", "items per prompt", 1)
    _assert_engine_healthy(llm)


def test_unnamed_modalities_keep_their_default_limits(llm):
    """limit_mm_per_prompt={"image": 1} must not turn audio off."""
    audio = [_speech(0.5, seed) for seed in range(2)]
    out = _generate(llm, {"prompt": _chat(AUDIO + AUDIO + "Compare."), "multi_modal_data": {"audio": audio}})[0]
    assert out.prompt_token_ids.count(llm.input_processor.token_ids.audio_pad) == 2 * audio_token_count(50)


def test_placeholder_item_mismatch_names_the_counts(llm):
    prompt = {"prompt": _chat(IMAGE + IMAGE + "Compare."), "multi_modal_data": {"image": _png(32, 32, 2)}}
    with pytest.raises(ValueError, match=r"2 placeholder.*1"):
        _generate(llm, prompt)
    _assert_engine_healthy(llm)


def test_use_audio_in_video_on_a_silent_video(llm):
    silent = encode_video(seconds=1.0, fps=4, with_audio=False)
    prompt = {"prompt": _chat(VIDEO + "Listen."), "multi_modal_data": {"video": silent},
              "mm_processor_kwargs": {"use_audio_in_video": True}}
    with pytest.raises(MediaError, match="no soundtrack"):
        _generate(llm, prompt)
    _assert_engine_healthy(llm)


# ---- encoder cache and media-aware prefix caching ----------------------------------------------


def test_same_image_encoded_once_and_prefix_cache_is_media_aware(llm):
    preamble = "You are a careful assistant who looks at pictures and answers in one short sentence. "
    image, other = _png(128, 192, 10), _png(128, 192, 11)  # 24 placeholder tokens each

    def request(text: str, picture: bytes) -> dict:
        return {"prompt": _chat(text + IMAGE + "What is in this picture?"), "multi_modal_data": {"image": picture}}

    scheduler = llm.engine.scheduler
    before = scheduler.make_stats()
    # Different text before the image, so the prefix cache cannot serve the image blocks: the encoder cache must.
    first, second = _generate(llm, [request(preamble, image), request("Look. " + preamble, image)])
    after_pair = scheduler.make_stats()
    assert after_pair.num_encoded_media - before.num_encoded_media == 1
    assert after_pair.encoder_cache_hits - before.encoder_cache_hits == 1
    assert first.num_cached_tokens == second.num_cached_tokens == 0

    later = _generate(llm, request("Be brief. " + preamble, image))[0]
    after_later = scheduler.make_stats()
    assert after_later.num_encoded_media == after_pair.num_encoded_media
    assert after_later.encoder_cache_hits - before.encoder_cache_hits >= 2
    assert later.num_cached_tokens == 0

    # Same text, same image: the prefix cache covers the image blocks; a different image stops before them.
    same, different = (_generate(llm, request(preamble, picture))[0] for picture in (image, other))
    image_start = first.prompt_token_ids.index(llm.input_processor.token_ids.image_pad)
    assert same.prompt_token_ids == different.prompt_token_ids == first.prompt_token_ids
    assert same.num_cached_tokens > image_start + 24
    assert 0 < different.num_cached_tokens <= image_start
    assert same.outputs[0].token_ids == first.outputs[0].token_ids
    assert scheduler.make_stats().num_encoded_media == after_later.num_encoded_media + 1  # only the new image
    first_logprob = {o.request_id: o.outputs[0].logprobs[0] for o in (same, different)}
    assert first_logprob[same.request_id] != first_logprob[different.request_id]  # the new image is what it sees


# ---- chat content parts ------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_chat_parts_match_generate(llm):
    png, wav, mp4 = _png(64, 96, 20), encode_audio("wav", "pcm_s16le", seconds=1.0), encode_video(2.0, fps=10)
    conversation = [{"role": "user", "content": [
        {"type": "text", "text": "Look "},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_b64(png)}"}},
        {"type": "text", "text": " listen "},
        {"type": "input_audio", "input_audio": {"data": _b64(wav), "format": "wav"}},
        {"type": "text", "text": " and watch "},
        {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{_b64(mp4)}"}},
    ]}]
    chat = llm.chat(conversation, GREEDY, use_tqdm=False)[0]
    prompt = llm.get_tokenizer().apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == _chat(f"Look {IMAGE} listen {AUDIO} and watch {VIDEO}")
    direct = _generate(llm, {"prompt": prompt, "multi_modal_data": {"image": png, "audio": wav, "video": mp4}})[0]
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids

    ids = llm.input_processor.token_ids
    tokens = chat.prompt_token_ids
    first_video_pad = tokens.index(ids.video_pad)
    video_start = max(i for i in range(first_video_pad) if tokens[i] == ids.vision_start)
    video_end = tokens.index(ids.vision_end, first_video_pad)
    span = tokens[video_start:video_end]
    assert ids.audio_start in span and ids.audio_pad in span  # the soundtrack is used by default
    assert ids.image_pad not in span


def test_chat_bad_base64_and_remote_urls(llm):
    bad = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}]}]
    with pytest.raises(MediaDecodeError, match="base64"):
        llm.chat(bad, GREEDY, use_tqdm=False)
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    with pytest.raises(MediaError, match="remote"):
        llm.chat(remote, GREEDY, use_tqdm=False)
    _assert_engine_healthy(llm)


def test_any_failure_withdraws_the_prompts_already_queued(llm):
    """Not only MediaError: an unusable source of the wrong type must not strand the good prompt before it."""
    good = {"prompt": _chat(AUDIO + "What is said?"), "multi_modal_data": {"audio": _speech(1.0)}}
    with pytest.raises(Exception):
        _generate(llm, [good, {"prompt": _chat(IMAGE), "multi_modal_data": {"image": 5}}])
    _assert_engine_healthy(llm)
