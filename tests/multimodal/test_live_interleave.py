"""A live video given slice by slice and audio run by audio run: the same pad order (`LiveInterleave` ==
`audio_video_interleave`) and the same TM-RoPE ids (`add_video_slice`/`add_soundtrack` == the whole-video calls),
whatever the order in which frames and audio arrived."""

from __future__ import annotations

import random

import pytest
import torch

from omnistream.multimodal.mrope import MRopeBuilder
from omnistream.multimodal.placeholders import LiveInterleave, audio_video_interleave


def _random_arrivals(rng: random.Random, slices: int, audio: int) -> list[tuple[str, int]]:
    """Slices and audio token batches in a random interleaving (each stream keeps its own order)."""
    events = [("slice", 1)] * slices
    left = audio
    while left:
        n = min(left, rng.randint(1, 40))
        events.append(("audio", n))
        left -= n
    order = sorted(range(len(events)), key=lambda _: rng.random())
    slice_events = [e for e in events if e[0] == "slice"]
    audio_events = [e for e in events if e[0] == "audio"]
    out = []
    for i in order:  # the kinds come in random order; within a kind, in stream order
        out.append((slice_events if events[i][0] == "slice" else audio_events).pop(0))
    return out


def _live(rng: random.Random, slices: int, audio: int, spg: float, with_audio: bool, take_every: bool):
    live = LiveInterleave(spg, with_audio=with_audio)
    runs = []
    for kind, n in _random_arrivals(rng, slices, audio if with_audio else 0):
        live.add_slices(n) if kind == "slice" else live.add_audio(n)
        if take_every:
            runs += live.take()
    live.end()
    return runs + live.take()


@pytest.mark.parametrize("spg", [1.0, 2.0, 0.5, 2 / 3, 0.4])
def test_live_interleave_equals_whole_video(spg):
    rng = random.Random(int(spg * 1000))
    for _ in range(60):
        t, h, w = rng.randint(1, 9), 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)
        audio = rng.choice([0, rng.randint(1, 200)])
        runs = _live(rng, t, audio, spg, True, rng.random() < 0.8)
        per_slice = h * w // 4
        order = []
        for run in runs:
            order += [True] * per_slice if run.is_video else [False] * (run.audio_stop - run.audio_start)
        assert order == audio_video_interleave((t, h, w), spg, audio)
        assert [r.slice_index for r in runs if r.is_video] == list(range(t))


def test_slices_and_audio_are_released_as_soon_as_their_place_is_known():
    live = LiveInterleave(1.0)  # slice i at 13·i
    live.add_audio(5)
    assert [(r.audio_start, r.audio_stop) for r in live.take()] == []  # slice 0 (time 0) goes first
    live.add_slices(1)
    runs = live.take()
    assert [r.slice_index for r in runs] == [0, None] and (runs[1].audio_start, runs[1].audio_stop) == (0, 5)
    live.add_slices(1)
    assert live.take() == []  # slice 1 waits for audio tokens 5..12
    live.add_audio(20)
    runs = live.take()
    assert [(r.slice_index, r.audio_start, r.audio_stop) for r in runs] == [(None, 5, 13), (1, 0, 0), (None, 13, 25)]
    live.end()
    assert live.take() == []
    with pytest.raises(ValueError, match="ended"):
        live.add_slices(1)


def test_silent_live_video_releases_every_slice_at_once():
    live = LiveInterleave(2.0, with_audio=False)
    live.add_slices(3)
    assert [r.slice_index for r in live.take()] == [0, 1, 2]
    with pytest.raises(ValueError, match="silent"):
        live.add_audio(1)


@pytest.mark.parametrize("with_audio", [True, False])
@pytest.mark.parametrize("spg", [1.0, 2.0, 0.5])
def test_live_positions_equal_whole_video(spg, with_audio):
    rng = random.Random(7 if with_audio else 8)
    for _ in range(40):
        t, h, w = rng.randint(1, 7), 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)
        audio = rng.randint(1, 150) if with_audio else 0
        prefix, suffix, n_bos = rng.randint(0, 5), rng.randint(1, 5), 2 if with_audio else 1
        whole = MRopeBuilder()
        parts = [whole.add_text(prefix), whole.add_start(n_bos)]
        if with_audio:
            parts.append(whole.add_video_with_audio((t, h, w), spg, audio)[0])
        else:
            parts.append(whole.add_video((t, h, w), spg))
        parts += [whole.add_end(n_bos), whole.add_text(suffix)]
        live = MRopeBuilder()
        got = [live.add_text(prefix), live.add_start(n_bos)]
        for run in _live(rng, t, audio, spg, with_audio, True):
            if run.is_video:
                got.append(live.add_video_slice(run.slice_index, (1, h, w), spg))
            else:
                got.append(live.add_soundtrack(run.audio_stop - run.audio_start))
        got += [live.add_end(n_bos), live.add_text(suffix)]
        assert torch.equal(torch.cat(got, dim=1), torch.cat(parts, dim=1))
        assert live.delta() == whole.delta() and live.num_tokens == whole.num_tokens
