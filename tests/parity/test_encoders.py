"""Parity of the audio (AuT) and vision (ViT + DeepStack) encoders and the multimodal forward against HF."""

from __future__ import annotations

import pytest
import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.model_executor.models.audio_encoder import audio_output_length
from tests.parity.hf_oracle import (
    TINY,
    build_hf_thinker,
    encoder_variant_config,
    hf_audio_features,
    hf_visual_features,
)
from tests.parity.test_text_parity import read_checkpoint, write_checkpoint

FP32_TOL = 1e-4
PRESETS = {"tiny": TINY, "encoder_variant": encoder_variant_config()}
AUDIO, IMAGE, VIDEO = 151675, 151655, 151656
AUDIO_START, AUDIO_END, VISION_START, VISION_END = 151669, 151670, 151652, 151653


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Builds each preset once: name -> (HF fp32 thinker, our fp32 model loaded from its thinker-only save, dir)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            hf = build_hf_thinker(PRESETS[name], seed=1)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            cache[name] = hf, load_model(path, "float32")[0], path
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(PRESETS))
def pair(request, checkpoints):
    return checkpoints(request.param)


def log_mel(num_frames: int, seed: int) -> torch.Tensor:
    return torch.randn(128, num_frames, generator=torch.Generator().manual_seed(seed))


def pixels(grids: list[tuple[int, int, int]], seed: int) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grids)
    return torch.rand(rows, 1536, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("num_frames", [50, 100, 250, 1650, 3000])
def test_audio_matches_hf(pair, num_frames):
    hf, model, _ = pair
    features = log_mel(num_frames, seed=num_frames)
    ours = model.embed_audio([features])[0]
    ref = hf_audio_features(hf, features)
    assert ours.shape == (audio_output_length(num_frames), 128) == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < FP32_TOL, f"T={num_frames}: max |diff| = {err:.2e}"


def test_audio_window_is_a_per_call_argument(pair):
    """window_frames=200 equals HF with n_window_infer=200, and differs from the default 800-frame window."""
    hf, model, _ = pair
    features = log_mel(1650, seed=7)
    small = model.embed_audio([features], window_frames=200)[0]
    default = model.embed_audio([features])[0]
    assert (small - default).abs().max().item() > 1e-3  # 26-token windows vs 104-token windows
    tower = hf.model.audio_tower
    tower.n_window_infer = 200
    try:
        ref = hf_audio_features(hf, features)
    finally:
        tower.n_window_infer = 800
    assert (small - ref).abs().max().item() < FP32_TOL
    with pytest.raises(ValueError, match="window_frames"):
        model.embed_audio([features], window_frames=250)


@pytest.mark.parametrize("window_frames", [800, 300])
def test_audio_window_by_window_equals_offline(pair, window_frames):
    _, model, _ = pair
    tower, features = model.audio_tower, log_mel(1650, seed=8)
    offline = tower(features, window_frames)
    bounds = [*range(0, 1650, window_frames), 1650]
    parts = [tower.encode_range(features, a, b, window_frames) for a, b in zip(bounds, bounds[1:])]
    expected = [audio_output_length(b) - audio_output_length(a) for a, b in zip(bounds, bounds[1:])]
    assert [len(p) for p in parts] == expected
    assert torch.allclose(torch.cat(parts), offline, atol=1e-5, rtol=0)
    # the prefix of a clip that is still growing: its open last window equals the offline encoding of that prefix
    assert torch.allclose(tower.encode_range(features, 800, 1234, 800), tower(features[:, :1234], 800)[104:], atol=1e-5)
    with pytest.raises(ValueError, match="window boundary"):
        tower.encode_range(features, 100, 900, 800)


def test_audio_batch_equals_single_clips(pair):
    _, model, _ = pair
    clips = [log_mel(n, seed=n) for n in (1650, 50, 250)]
    batched = model.embed_audio(clips)
    for clip, out in zip(clips, batched):
        assert torch.allclose(out, model.embed_audio([clip])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "grids, video",
    [([(1, 4, 6)], False), ([(1, 8, 8)], False), ([(1, 4, 6), (1, 8, 8)], False), ([(2, 4, 4)], True)],
    ids=["image_4x6", "image_8x8", "two_images", "video_2x4x4"],
)
def test_visual_matches_hf(pair, grids, video):
    hf, model, _ = pair
    values = pixels(grids, seed=len(grids))
    embeds, deepstack = model.embed_visual(values, grids)
    ref, ref_deepstack = hf_visual_features(hf, values, grids, video)
    assert embeds.shape == ref.shape and deepstack.shape[0] == len(ref_deepstack)
    assert (embeds - ref).abs().max().item() < FP32_TOL
    for level, ref_level in zip(deepstack, ref_deepstack):
        assert (level - ref_level).abs().max().item() < FP32_TOL


def prefill_logits(model, input_ids, positions, inputs_embeds, deepstack_embeds) -> torch.Tensor:
    """One request's whole prompt in one flat-batch step over a fresh paged KV cache."""
    block_size, length = 16, len(input_ids)
    num_blocks = -(-length // block_size)
    caches = [torch.zeros(model.kv_cache_shape_per_layer(num_blocks, block_size)) for _ in range(model.num_layers)]
    metadata = AttentionMetadata.build([length], [length], [list(range(num_blocks))], block_size)
    with torch.no_grad():
        hidden = model(input_ids, positions, caches, metadata, inputs_embeds=inputs_embeds,
                       deepstack_embeds=deepstack_embeds)
    return model.compute_logits(hidden)


def test_multimodal_forward_matches_hf(pair):
    """Text + audio (several windows) + image + video: our merge + DeepStack + HF M-RoPE positions = HF logits."""
    hf, model, _ = pair
    gen = torch.Generator().manual_seed(5)
    text = lambda n: torch.randint(0, 151643, (n,), generator=gen).tolist()  # noqa: E731
    features = log_mel(900, seed=11)  # 117 tokens: a full 104-token window and a remainder
    image_grid, video_grid = [(1, 4, 6)], [(2, 4, 4)]
    image_px, video_px = pixels(image_grid, seed=12), pixels(video_grid, seed=13)
    ids = (text(5) + [AUDIO_START] + [AUDIO] * audio_output_length(900) + [AUDIO_END] + text(3)
           + [VISION_START] + [IMAGE] * 6 + [VISION_END] + text(2) + [VISION_START] + [VIDEO] * 8 + [VISION_END]
           + text(4))
    input_ids = torch.tensor(ids)
    mask = torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        ref = hf(
            input_ids=input_ids[None], attention_mask=mask, input_features=features[None],
            feature_attention_mask=torch.ones(1, 900, dtype=torch.long), pixel_values=image_px,
            image_grid_thw=torch.tensor(image_grid), pixel_values_videos=video_px,
            video_grid_thw=torch.tensor(video_grid), video_second_per_grid=torch.tensor([1.0]),
        ).logits[0]
        positions, _ = hf.model.get_rope_index(
            input_ids[None], torch.tensor(image_grid), torch.tensor(video_grid), mask,
            audio_seqlens=torch.tensor([900]), second_per_grids=torch.tensor([1.0]),
        )

    embeds = model.embed_input_ids(input_ids)
    embeds[input_ids == AUDIO] = model.embed_audio([features])[0]
    image, image_ds = model.embed_visual(image_px, image_grid)
    video, video_ds = model.embed_visual(video_px, video_grid)
    embeds[input_ids == IMAGE], embeds[input_ids == VIDEO] = image, video
    deepstack = embeds.new_zeros(image_ds.shape[0], len(ids), embeds.shape[-1])
    deepstack[:, input_ids == IMAGE], deepstack[:, input_ids == VIDEO] = image_ds, video_ds

    ours = prefill_logits(model, input_ids, positions[:, 0], embeds, deepstack)
    err = (ours - ref).abs().max().item()
    assert err < FP32_TOL, f"max |logit diff| = {err:.2e}"
    no_deepstack = prefill_logits(model, input_ids, positions[:, 0], embeds, None)
    assert (no_deepstack - ref).abs().max().item() > 1e-3  # DeepStack is really exercised


@pytest.mark.parametrize(
    "drop, add, reported",
    [
        ("audio_tower.layers.1.self_attn.k_proj.bias", None, "audio_tower.layers.1.self_attn.qkv_proj.bias"),
        (None, "visual.blocks.0.attn.extra.weight", "visual.blocks.0.attn.extra.weight"),
    ],
    ids=["missing_audio", "unknown_visual"],
)
def test_encoder_checkpoint_errors(checkpoints, tmp_path, drop, add, reported):
    _, _, path = checkpoints("tiny")
    tensors, config = read_checkpoint(path)
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(2)
    with pytest.raises(ValueError, match=reported.replace(".", r"\.")):
        load_model(write_checkpoint(tmp_path / "edited", tensors, config))
