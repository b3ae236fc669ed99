"""Audio token count and placeholder expansion against HF's own functions (processor expansion driven directly)."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

from omnistream.multimodal.mrope import MRopeBuilder
from omnistream.multimodal.placeholders import (
    AudioItem,
    ImageItem,
    MultimodalTokenIds,
    PlaceholderRange,
    VideoItem,
    audio_token_count,
    audio_video_interleave,
    expand_placeholders,
)

IDS = MultimodalTokenIds(audio_pad=151675, image_pad=151655, video_pad=151656, audio_start=151669,
                         audio_end=151670, vision_start=151652, vision_end=151653)
NAMES = {IDS.audio_pad: "<|audio_pad|>", IDS.image_pad: "<|image_pad|>", IDS.video_pad: "<|video_pad|>",
         IDS.audio_start: "<|audio_start|>", IDS.audio_end: "<|audio_end|>",
         IDS.vision_start: "<|vision_start|>", IDS.vision_end: "<|vision_end|>"}
BY_NAME = {name: token for token, name in NAMES.items()}


def test_audio_token_count_matches_hf():
    frames = torch.arange(0, 5001)
    assert [audio_token_count(t) for t in range(5001)] == _get_feat_extract_output_lengths(frames, 50).tolist()
    table = {1: 1, 7: 1, 8: 1, 9: 2, 50: 7, 99: 13, 100: 13, 101: 14, 200: 26, 250: 33, 1000: 130, 1650: 215,
             3000: 390, 30000: 3900}  # doc §3.7
    assert {t: audio_token_count(t) for t in table} == table
    with pytest.raises(ValueError):
        audio_token_count(-1)


# ---- HF's processor expansion, driven without tokenizer/feature extractor/video processor ------------------


def hf_processor():
    """HF's Qwen3-Omni processor with only what its replace_* and text-replacement code read."""
    proc = object.__new__(Qwen3OmniMoeProcessor)
    proc.image_token, proc.video_token, proc.audio_token = "<|image_pad|>", "<|video_pad|>", "<|audio_pad|>"
    proc.audio_bos_token, proc.audio_eos_token = "<|audio_start|>", "<|audio_end|>"
    proc.image_processor = SimpleNamespace(merge_size=2)
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    return proc


def hf_expand(prompt: list[int], items: list) -> list[int]:
    proc = hf_processor()
    audios = [i for i in items if isinstance(i, AudioItem)]
    images = [i for i in items if isinstance(i, ImageItem)]
    videos = [i for i in items if isinstance(i, VideoItem)]
    # the processor's audio list: standalone clips, then each video's soundtrack (video_to_audio_indices)
    mel = [a.num_mel_frames for a in audios] + [v.audio_mel_frames for v in videos if v.has_audio]
    audio_inputs = {"num_audio_tokens": _get_feat_extract_output_lengths(np.array(mel or [1]), 50)}
    video_to_audio, next_audio = [], len(audios)
    for v in videos:
        video_to_audio.append(next_audio if v.has_audio else None)
        next_audio += v.has_audio
    image_inputs = {"image_grid_thw": np.array([i.grid_thw for i in images] or [[1, 2, 2]])}
    video_inputs = {"video_grid_thw": np.array([v.grid_thw for v in videos] or [[1, 2, 2]]),
                    "video_second_per_grid": [v.second_per_grid for v in videos]}
    text = "".join(NAMES.get(t, f"<|t{t}|>") for t in prompt)
    (expanded,), _ = proc.get_text_with_replacements(
        [text],
        [proc.replace_image_token(image_inputs, k) for k in range(len(images))],
        [proc.replace_video_token(video_inputs, k, processed_audio=audio_inputs,
                                  video_to_audio_indices=video_to_audio,
                                  load_audio_from_video=any(v.has_audio for v in videos),
                                  position_id_per_seconds=13.0)
         for k in range(len(videos))],
        [proc.replace_audio_token(audio_inputs, k) for k in range(len(audios))],
    )
    names = re.findall(r"<\|[^|]+\|>", expanded)
    return [BY_NAME[n] if n in BY_NAME else int(n[3:-2]) for n in names]


def render(segments) -> tuple[list[int], list]:
    ids, items = [], []
    for seg in segments:
        if isinstance(seg, list):
            ids += seg
            continue
        items.append(seg)
        if isinstance(seg, AudioItem):
            ids += [IDS.audio_start, IDS.audio_pad, IDS.audio_end]
        else:
            pad = IDS.image_pad if isinstance(seg, ImageItem) else IDS.video_pad
            ids += [IDS.vision_start, pad, IDS.vision_end]
    return ids, items


def random_segments(rng: random.Random) -> list:
    segments = [[rng.randrange(10, 1000) for _ in range(rng.randint(0, 3))]]
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["text", "audio", "image", "video", "video"])
        if kind == "text":
            segments.append([rng.randrange(10, 1000) for _ in range(rng.randint(1, 5))])
        elif kind == "audio":
            segments.append(AudioItem(rng.choice([1, 8, 9, 100, 101, rng.randint(1, 1200)])))
        elif kind == "image":
            segments.append(ImageItem((1, 2 * rng.randint(1, 8), 2 * rng.randint(1, 8))))
        else:
            grid = (rng.randint(1, 8), 2 * rng.randint(1, 4), 2 * rng.randint(1, 4))
            audio = rng.choice([None, 1, 13, 200, rng.randint(1, 900)])
            segments.append(VideoItem(grid, rng.choice([0.5, 1.0, 2.0, 1.5, 2 / 3]), audio))
    return segments


def check_ranges(expanded: list[int], items: list, ranges: list[PlaceholderRange]) -> None:
    """Ranges are in order of appearance, cover exactly the pads, and split audio-in-video rows correctly."""
    pads = {"audio": IDS.audio_pad, "image": IDS.image_pad, "video": IDS.video_pad}
    covered = set()
    assert [r.offset for r in ranges] == sorted(r.offset for r in ranges)
    per_modality = {"audio": 0, "image": 0, "video": 0}
    for r in ranges:
        assert r.item_index == per_modality[r.modality]
        per_modality[r.modality] += 1
        rows = range(r.offset, r.offset + r.length)
        covered.update(rows)
        if r.is_video is None:
            assert all(expanded[i] == pads[r.modality] for i in rows)
        else:
            assert r.modality == "video" and len(r.is_video) == r.length
            assert expanded[r.offset - 2:r.offset] == [IDS.vision_start, IDS.audio_start]
            assert expanded[r.offset + r.length:r.offset + r.length + 2] == [IDS.audio_end, IDS.vision_end]
            assert r.video_rows == [i for i in rows if expanded[i] == IDS.video_pad]
            assert r.audio_rows == [i for i in rows if expanded[i] == IDS.audio_pad]
    assert covered == {i for i, t in enumerate(expanded) if t in pads.values()}


def test_random_prompts_expand_like_hf_processor():
    rng = random.Random(2024)
    for _ in range(300):
        prompt, items = render(random_segments(rng))
        rng.shuffle(items)  # only the order within a modality matters
        items.sort(key=lambda i: type(i).__name__)
        expanded, ranges = expand_placeholders(prompt, items, IDS)
        assert expanded == hf_expand(prompt, items), items
        check_ranges(expanded, items, ranges)


def test_worked_example_2_layout():
    prompt, items = render([[1, 2, 3], VideoItem((2, 4, 4), 1.0, audio_mel_frames=200), [4]])
    expanded, (r,) = expand_placeholders(prompt, items, IDS)
    v, a = IDS.video_pad, IDS.audio_pad
    assert expanded == [1, 2, 3, IDS.vision_start, IDS.audio_start] + [v] * 4 + [a] * 13 + [v] * 4 + [a] * 13 + [
        IDS.audio_end, IDS.vision_end, 4]
    assert (r.modality, r.item_index, r.offset, r.length) == ("video", 0, 5, 34)
    assert r.video_rows == [5, 6, 7, 8, 22, 23, 24, 25]
    assert r.audio_rows == list(range(9, 22)) + list(range(26, 39))


def test_simple_ranges_and_token_ids_from_config():
    config = dict(audio_token_id=151675, image_token_id=151655, video_token_id=151656, audio_start_token_id=151669,
                  audio_end_token_id=151670, vision_start_token_id=151652, vision_end_token_id=151653)
    assert MultimodalTokenIds.from_config(config) == IDS
    assert MultimodalTokenIds.from_config(SimpleNamespace(**config)) == IDS
    with pytest.raises(ValueError, match="vision_start_token_id"):
        MultimodalTokenIds.from_config({k: v for k, v in config.items() if k != "vision_start_token_id"})
    prompt, items = render([[7], AudioItem(250), ImageItem((1, 4, 6)), VideoItem((3, 2, 4), 2.0)])
    expanded, ranges = expand_placeholders(prompt, items, IDS)
    assert [(r.modality, r.item_index, r.offset, r.length) for r in ranges] == [
        ("audio", 0, 2, 33), ("image", 0, 37, 6), ("video", 0, 45, 6)]
    assert ranges[0].audio_rows == list(range(2, 35)) and ranges[0].video_rows == []
    assert ranges[2].video_rows == list(range(45, 51)) and ranges[2].audio_rows == []


@pytest.mark.parametrize("modality, items, pads, given", [
    ("audio", [AudioItem(10)], 2, 1),
    ("image", [ImageItem((1, 2, 2)), ImageItem((1, 2, 2))], 1, 2),
    ("video", [], 1, 0),
])
def test_count_mismatch_names_modality_and_counts(modality, items, pads, given):
    pad = {"audio": IDS.audio_pad, "image": IDS.image_pad, "video": IDS.video_pad}[modality]
    prompt = [1] + [pad] * pads + [2]
    other = [AudioItem(10)] if modality == "image" else []  # the other modalities still pair up
    prompt += [IDS.audio_pad] * len(other)
    with pytest.raises(ValueError, match=rf"{modality}: the prompt has {pads} placeholder.*{given} {modality}"):
        expand_placeholders(prompt, items + other, IDS)


def test_interleave_order_agrees_with_rope_merge():
    """For fps 0.5..4 (second_per_grid 4, 2, 1, 0.5, 1.5), the processor's pad order (float64) equals the order
    in which get_rope_index assigns positions (float32 with the start added), so rows and positions line up."""
    rng = random.Random(5)
    for _ in range(120):
        grid = (rng.randint(1, 12), 2 * rng.randint(1, 3), 2 * rng.randint(1, 3))
        spg, n_audio = rng.choice([4.0, 2.0, 1.0, 0.5, 1.5]), rng.randint(0, 400)
        builder = MRopeBuilder()
        builder.add_text(rng.randint(0, 5000))
        builder.add_start(2)
        _, is_video = builder.add_video_with_audio(grid, spg, n_audio)
        assert audio_video_interleave(grid, spg, n_audio) == is_video.tolist()
