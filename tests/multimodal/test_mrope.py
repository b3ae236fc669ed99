"""TM-RoPE position ids against HF `get_rope_index` (exact float equality), and incremental == whole prompt."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

from omnistream.multimodal.mrope import MRopeBuilder, mrope_positions_for_prompt
from omnistream.multimodal.placeholders import (
    AudioItem,
    ImageItem,
    MultimodalTokenIds,
    VideoItem,
    expand_placeholders,
)

IDS = MultimodalTokenIds(audio_pad=151675, image_pad=151655, video_pad=151656, audio_start=151669,
                         audio_end=151670, vision_start=151652, vision_end=151653)
IM_START, IM_END, NL, USER, ASSISTANT = 151644, 151645, 198, 872, 77091

# doc §9 tiny config; get_rope_index reads only the config, so the model is built on the meta device
TINY = dict(
    text_config=dict(vocab_size=152064, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     num_experts=4, num_experts_per_tok=2, mlp_only_layers=[],
                     rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[6, 5, 5],
                                          interleaved=True, mrope_interleaved=True)),
    vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                       temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                       deepstack_visual_indexes=[0, 1]),
    audio_config=dict(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                      encoder_ffn_dim=64, output_dim=64, downsample_hidden_size=8, n_window=50,
                      n_window_infer=800),
    audio_token_id=151675, image_token_id=151655, video_token_id=151656,
    audio_start_token_id=151669, audio_end_token_id=151670,
    vision_start_token_id=151652, vision_end_token_id=151653,
    position_id_per_seconds=13, seconds_per_chunk=2, tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def hf_model():
    with torch.device("meta"):
        thinker = Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**copy.deepcopy(TINY)))
    return thinker.model


def render(segments) -> tuple[list[int], list]:
    """Chat-template-style prompt ids with one pad per media item, and the items in order."""
    ids, items = [], []
    for seg in segments:
        if isinstance(seg, list):
            ids += seg
        elif isinstance(seg, AudioItem):
            ids += [IDS.audio_start, IDS.audio_pad, IDS.audio_end]
        elif isinstance(seg, ImageItem):
            ids += [IDS.vision_start, IDS.image_pad, IDS.vision_end]
        else:
            ids += [IDS.vision_start, IDS.video_pad, IDS.vision_end]
        if not isinstance(seg, list):
            items.append(seg)
    return ids, items


def random_segments(rng: random.Random, audio_in_video: bool, spgs=(0.5, 1.0, 2.0, 1.5)) -> list:
    segments = [[IM_START, USER, NL]]
    for _ in range(rng.randint(0, 6)):
        kind = rng.choice(["text", "audio", "image", "video", "video"])
        if kind == "text":
            segments.append([rng.randrange(100, 100_000) for _ in range(rng.randint(1, 12))])
        elif kind == "audio":
            segments.append(AudioItem(rng.choice([1, 7, 8, 9, 99, 100, 101, 250, rng.randint(1, 900)])))
        elif kind == "image":
            segments.append(ImageItem((1, 2 * rng.randint(1, 7), 2 * rng.randint(1, 7))))
        else:
            grid = (rng.randint(1, 6), 2 * rng.randint(1, 4), 2 * rng.randint(1, 4))
            audio = rng.choice([1, 13, 100, 200, rng.randint(1, 700)]) if audio_in_video else None
            segments.append(VideoItem(grid, rng.choice(spgs), audio))
    return segments + [[IM_END, NL, IM_START, ASSISTANT, NL]]


def hf_positions(model, token_ids: list[int], items: list, use_audio_in_video: bool):
    images = [i.grid_thw for i in items if isinstance(i, ImageItem)]
    videos = [i for i in items if isinstance(i, VideoItem)]
    # HF consumes audio_seqlens per <|audio_start|> in order of appearance, a video's soundtrack included
    audio_frames = [i.num_mel_frames if isinstance(i, AudioItem) else i.audio_mel_frames
                    for i in items if isinstance(i, AudioItem) or (isinstance(i, VideoItem) and i.has_audio)]
    input_ids = torch.tensor([token_ids])
    positions, delta = model.get_rope_index(
        input_ids,
        image_grid_thw=torch.tensor(images) if images else None,
        video_grid_thw=torch.tensor([v.grid_thw for v in videos]) if videos else None,
        attention_mask=torch.ones_like(input_ids),
        use_audio_in_video=use_audio_in_video,
        audio_seqlens=torch.tensor(audio_frames) if audio_frames else None,
        second_per_grids=torch.tensor([v.second_per_grid for v in videos]) if videos else None,
    )
    return positions[:, 0], float(delta[0, 0])


def ours(segments):
    prompt, items = render(segments)
    expanded, _ = expand_placeholders(prompt, items, IDS)
    positions, delta = mrope_positions_for_prompt(expanded, items, IDS)
    return expanded, items, positions, delta


# ---- the doc's worked examples (§5.5, §5.6) --------------------------------------------------------------


def test_worked_example_1_audio_and_image(hf_model):
    segments = [[IM_START, USER, NL], AudioItem(250), ImageItem((1, 4, 6)), [11, 12, 13],
                [IM_END, NL, IM_START, ASSISTANT, NL]]
    expanded, items, positions, delta = ours(segments)
    assert len(expanded) == 54 and positions.dtype == torch.float32
    text = lambda a, b: [[float(p)] * 3 for p in range(a, b)]  # noqa: E731
    image = [[39, 39, 39], [39, 39, 40], [39, 39, 41], [39, 40, 39], [39, 40, 40], [39, 40, 41]]
    expected = text(0, 3) + text(3, 4) + text(4, 37) + text(37, 38) + text(38, 39) + image + text(42, 51)
    assert positions.T.tolist() == expected
    assert delta == -3.0
    hf, hf_delta = hf_positions(hf_model, expanded, items, False)
    assert torch.equal(positions, hf) and delta == hf_delta


def test_worked_example_2_video_with_its_audio(hf_model):
    segments = [[IM_START, USER, NL], VideoItem((2, 4, 4), 1.0, audio_mel_frames=200), [11, 12],
                [IM_END, NL, IM_START, ASSISTANT, NL][1:]]
    expanded, items, positions, delta = ours(segments)
    assert len(expanded) == 47
    cols = positions.T.tolist()
    assert cols[3] == [3, 3, 3] and cols[4] == [4, 4, 4]
    assert cols[5:9] == [[5, 5, 5], [5, 5, 6], [5, 6, 5], [5, 6, 6]]
    assert cols[9:22] == [[p, p, p] for p in range(5, 18)]
    assert cols[22:26] == [[18, 5, 5], [18, 5, 6], [18, 6, 5], [18, 6, 6]]
    assert cols[26:39] == [[p, p, p] for p in range(18, 31)]
    assert cols[39] == [31, 31, 31] and cols[40] == [32, 32, 32]
    assert cols[41:] == [[p, p, p] for p in range(33, 39)]
    assert delta == -8.0
    hf, hf_delta = hf_positions(hf_model, expanded, items, True)
    assert torch.equal(positions, hf) and delta == hf_delta


# ---- randomised against HF -----------------------------------------------------------------------------


@pytest.mark.parametrize("audio_in_video", [False, True])
def test_random_prompts_match_hf(hf_model, audio_in_video):
    rng = random.Random(1234 + audio_in_video)
    for _ in range(150):
        segments = random_segments(rng, audio_in_video)
        expanded, items, positions, delta = ours(segments)
        hf, hf_delta = hf_positions(hf_model, expanded, items, audio_in_video)
        assert torch.equal(positions, hf), segments
        assert delta == hf_delta, segments


def test_float_rounding_order_matches_hf(hf_model):
    """Fractional temporal ids (fps 7, 3, 5, 30: second_per_grid 2/7, 2/3, 0.4, 1/15), near 0 and past powers of
    two: t·spg·13 must be rounded to float32 step by step like HF (a float64 product differs in the last bit)."""
    rng = random.Random(7)
    for _ in range(40):
        segments = [[rng.randrange(100, 1000) for _ in range(rng.choice([1, 5, 30, 1000, 2000, 4000]))]]
        segments += random_segments(rng, rng.random() < 0.5, spgs=(2 / 7, 2 / 3, 0.4, 2 / 30))[1:]
        expanded, items, positions, delta = ours(segments)
        use_av = any(isinstance(i, VideoItem) and i.has_audio for i in items)
        hf, hf_delta = hf_positions(hf_model, expanded, items, use_av)
        assert torch.equal(positions, hf), segments
        assert delta == hf_delta


# ---- incremental == whole prompt -----------------------------------------------------------------------


def _split(rng: random.Random, n: int) -> list[int]:
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 3)))) if n > 1 else []
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


def build_incrementally(rng: random.Random, segments) -> tuple[torch.Tensor, float]:
    """What a streaming caller does: one builder, text and audio appended in random pieces."""
    builder = MRopeBuilder()
    parts = []
    for seg in segments:
        if isinstance(seg, list):
            parts += [builder.add_text(k) for k in _split(rng, len(seg))]
        elif isinstance(seg, AudioItem):
            parts.append(builder.add_start())
            parts += [builder.add_audio(k) for k in _split(rng, seg.num_tokens)]
            parts.append(builder.add_end())
        elif isinstance(seg, ImageItem):
            parts += [builder.add_start(), builder.add_image(seg.grid_thw), builder.add_end()]
        elif seg.has_audio:
            parts += [builder.add_start(), builder.add_start()]  # vision_start, then audio_start
            parts.append(builder.add_video_with_audio(seg.grid_thw, seg.second_per_grid, seg.num_audio_tokens)[0])
            parts += [builder.add_end(), builder.add_end()]
        else:
            parts += [builder.add_start(), builder.add_video(seg.grid_thw, seg.second_per_grid), builder.add_end()]
    return torch.cat(parts, dim=1), builder.delta()


def test_incremental_equals_whole_prompt():
    rng = random.Random(99)
    for i in range(300):
        spgs = (0.5, 1.0, 2.0, 1.5) if i % 3 else (2 / 7, 2 / 3, 0.4)
        segments = random_segments(rng, i % 2 == 1, spgs=spgs)
        if i % 5 == 0:
            segments.insert(0, [5] * rng.choice([1000, 2040, 4090]))
        _, _, whole, delta = ours(segments)
        incremental, incremental_delta = build_incrementally(rng, segments)
        assert torch.equal(incremental, whole), segments
        assert incremental_delta == delta


def test_streamed_audio_windows_equal_one_clip():
    """A live clip appended window by window (104 tokens per 8 s window) equals the offline clip, and the text
    after it continues where the offline prompt does."""
    def run(windows):
        builder = MRopeBuilder()
        builder.add_text(3)
        builder.add_image((1, 6, 10))  # a non-consecutive block before, so the start is max(block) + 1
        builder.add_end()
        builder.add_start()
        audio = torch.cat([builder.add_audio(k) for k in windows], dim=1)
        return audio, builder.add_end(), builder.add_text(4), builder.delta()

    offline = run([104 * 3 + 29])
    streamed = run([104, 104, 104, 29])
    for a, b in zip(offline[:3], streamed[:3]):
        assert torch.equal(a, b)
    assert offline[3] == streamed[3]
    assert torch.equal(offline[0][0], offline[0][2]) and torch.all(offline[0][0].diff() == 1)


def test_builder_empty_and_errors():
    builder = MRopeBuilder()
    assert builder.add_text(0).shape == (3, 0) and builder.delta() == 0.0
    assert torch.equal(builder.add_text(2), torch.tensor([[0.0, 1.0]] * 3))
    assert builder.delta() == 0.0 and builder.delta(5) == -3.0
    with pytest.raises(ValueError):
        builder.add_image((1, 3, 4))  # not divisible by the merge size
    with pytest.raises(ValueError):
        builder.add_audio(-1)


def test_prompt_token_item_mismatch_raises():
    prompt, items = render([[1, 2], AudioItem(100), ImageItem((1, 2, 2))])
    expanded, _ = expand_placeholders(prompt, items, IDS)
    with pytest.raises(ValueError, match="AudioItem"):
        mrope_positions_for_prompt(expanded, items[1:], IDS)
    with pytest.raises(ValueError, match="audio pads"):
        mrope_positions_for_prompt(expanded, [AudioItem(200), items[1]], IDS)
    with pytest.raises(ValueError, match="ImageItem"):
        mrope_positions_for_prompt(expanded, items + [ImageItem((1, 2, 2))], IDS)
