"""Code2wav for many voices in one forward per step: each voice's streamed samples equal its own whole-sequence
decode (within 1e-5, 1365 samples for its first frame, then 1920 per frame) whatever the other voices in the
batch, the chunk sizes, the order of pushes and the rows reused after a voice is dropped.
"""

from __future__ import annotations

import random

import pytest
import torch

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.models.code2wav_voices import Code2WavVoices
from omnistream.engine.model_executor.speech_loader import load_speech_models

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return load_speech_models(default_model_path()).code2wav


def codes_of(seed: int, frames: int) -> torch.Tensor:
    return torch.randint(0, 2048, (16, frames), generator=torch.Generator().manual_seed(seed))


def whole(model, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(codes.unsqueeze(0)).reshape(-1)


def stream_all(model, voices: dict[str, torch.Tensor], capacity: int, seed: int, chunk: int) -> dict[str, list]:
    """Push every voice to its end; each step a random subset of the unfinished voices advances by `chunk`
    frames (the last push of a voice may be shorter, alone)."""
    rng = random.Random(seed)
    batched, pieces, done = Code2WavVoices(model, capacity), {v: [] for v in voices}, dict.fromkeys(voices, 0)
    while any(done[v] < c.shape[1] for v, c in voices.items()):
        left = [v for v, c in voices.items() if c.shape[1] - done[v] >= chunk]
        names = rng.sample(left, rng.randint(1, len(left))) if left else []
        if not names:  # only short tails remain: push them one voice at a time
            names = [next(v for v, c in voices.items() if done[v] < c.shape[1])]
        n = min(chunk, min(voices[v].shape[1] - done[v] for v in names))
        out = batched.push(names, torch.stack([voices[v][:, done[v] : done[v] + n] for v in names]))
        for name, (start, stop) in zip(names, out.spans):
            pieces[name].append(out.samples[start:stop])
            done[name] += n
    return pieces


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_voice_streams_its_own_whole_decode_in_any_mix(model, chunk, seed):
    voices = {f"v{i}": codes_of(10 * seed + i, frames) for i, frames in enumerate([7, 12, 5, 9])}
    pieces = stream_all(model, voices, capacity=4, seed=seed, chunk=chunk)
    for name, codes in voices.items():
        expected = whole(model, codes)
        got = torch.cat(pieces[name])
        assert pieces[name][0].numel() == chunk * 1920 - 555
        assert got.numel() == expected.numel() == codes.shape[1] * 1920 - 555
        assert (got - expected).abs().max() <= TOL
        assert expected.abs().max() > 0.05  # not a comparison of silences


def test_the_ring_wraps_past_the_window_for_voices_at_different_frames(model):
    voices = {"long": codes_of(5, 80), "late": codes_of(6, 75)}
    batched, got = Code2WavVoices(model, 2), {"long": [], "late": []}
    for t in range(80):
        names = ["long"] + (["late"] if 5 <= t < 80 else [])
        frames = [voices["long"][:, t]] + ([voices["late"][:, t - 5]] if len(names) == 2 else [])
        out = batched.push(names, torch.stack(frames).unsqueeze(2))
        for name, (start, stop) in zip(names, out.spans):
            got[name].append(out.samples[start:stop])
    for name, codes in voices.items():
        assert (torch.cat(got[name]) - whole(model, codes)).abs().max() <= TOL


def test_a_dropped_voice_frees_its_row_and_a_new_voice_there_starts_fresh(model):
    first, second, other = codes_of(1, 6), codes_of(2, 6), codes_of(3, 12)
    batched = Code2WavVoices(model, 2)
    batched.push(["a", "b"], torch.stack([first[:, :6], other[:, :6]]))
    batched.drop("a")
    assert "a" not in batched and len(batched) == 1
    out = batched.push(["b", "c"], torch.stack([other[:, 6:], second]))
    (b_start, b_stop), (c_start, c_stop) = out.spans
    assert (out.samples[c_start:c_stop] - whole(model, second)).abs().max() <= TOL
    assert (out.samples[b_start:b_stop] - whole(model, other)[6 * 1920 - 555 :]).abs().max() <= TOL


def test_a_voice_beyond_the_capacity_is_refused(model):
    batched = Code2WavVoices(model, 1)
    batched.push(["a"], codes_of(0, 1).unsqueeze(0))
    with pytest.raises(ValueError, match="holds 1 voices"):
        batched.push(["b"], codes_of(1, 1).unsqueeze(0))


def test_the_warm_up_leaves_no_voice_and_fresh_rows(model):
    batched = Code2WavVoices(model, 3)
    batched.warm_up()
    assert len(batched) == 0
    codes = codes_of(4, 3)
    out = batched.push(["a"], codes.unsqueeze(0))
    assert (out.samples - whole(model, codes)).abs().max() <= TOL
