"""RunnerRequestState and the slot tables keep per-step work proportional to the batch: M-RoPE ids settled when a
segment arrives (text ids are token + delta, so a chunk costs nothing per text token and chunking never changes
an id), page ids staged and applied with one scatter into preallocated rows that freed slots give back, media
looked up from the first one not yet computed, and the encoder inputs of media wholly computed dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.engine.worker.request_state import RunnerRequestState
from omnistream.engine.worker.slot_tables import SlotTables
from omnistream.multimodal.tensor_codec import to_tensor_data
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.tensor_data import PositionSegment


def _audio(offset: int, length: int) -> MultiModalFeature:
    return MultiModalFeature(modality="audio", identifier=f"window-{offset}", offset=offset, length=length,
                             inputs={"input_features": to_tensor_data(torch.randn(128, 100))})


def _state(features: list[MultiModalFeature]) -> RunnerRequestState:
    return RunnerRequestState(req_id="r", token_ids=list(range(1000)), num_prompt_tokens=1000,
                              sampling_params=SamplingParams(), mm_features=features)


def _segment(start: int, ids: torch.Tensor) -> PositionSegment:
    return PositionSegment(start=start, positions=to_tensor_data(ids.contiguous()))


def _resolve_one_by_one(segments: list[tuple[int, torch.Tensor]], count: int) -> torch.Tensor:
    """HF's rule written out token by token: explicit ids where given, else the largest id so far plus one."""
    ids = torch.empty(3, count)
    largest, token = -1.0, 0
    explicit = dict(segments)
    while token < count:
        if token in explicit:
            segment = explicit[token]
            ids[:, token : token + segment.shape[1]] = segment
            largest = max(largest, float(segment.max()))
            token += segment.shape[1]
        else:
            largest += 1
            ids[:, token] = largest
            token += 1
    return ids


def test_positions_by_chunks_equal_the_token_by_token_rule() -> None:
    segments = [(5, torch.arange(40, dtype=torch.float32).expand(3, -1) + 100), (300, torch.rand(3, 260) * 50 + 400),
                (560, torch.full((3, 7), 20.0))]  # the last lies below the largest id so far
    state = _state([])
    state.add_segments([_segment(s, p) for s, p in segments[:2]])
    got = [state.positions(start, min(start + 37, 560)) for start in range(0, 560, 37)]
    state.add_segments([_segment(*segments[2])])  # arrives later, as a session's new input does
    got += [state.positions(start, min(start + 37, 900)) for start in range(560, 900, 37)]
    want = _resolve_one_by_one(segments, 900)
    assert torch.equal(torch.cat(got, dim=1), want)
    assert state.explicit_positions(600, 640) is None and state.explicit_positions(290, 301) is not None
    assert float(want[0, 45]) == 140.0  # text after a segment continues from the largest id so far


def test_a_segment_overlapping_an_earlier_one_is_refused() -> None:
    state = _state([])
    state.add_segments([_segment(10, torch.zeros(3, 20))])
    with pytest.raises(ValueError, match="overlaps"):
        state.add_segments([_segment(25, torch.zeros(3, 5))])


def test_pages_are_staged_then_scattered_once_and_freed_rows_hold_the_sink() -> None:
    tables = SlotTables(num_slots=4, max_pages=8, sink_page=99, device=torch.device("cpu"))
    a, b = tables.claim(0), tables.claim(16)
    tables.add_pages(a, [7, 8])
    tables.add_pages(b, [3])
    assert (tables.block_table == 99).all()  # nothing written before apply_staged
    tables.apply_staged()
    tables.add_pages(a, [9, 2])
    tables.apply_staged()
    assert tables.block_table[a, :5].tolist() == [7, 8, 9, 2, 99] and tables.block_table[b, :2].tolist() == [3, 99]
    assert tables.rows(np.array([b, a]), 3).tolist() == [[3, 99, 99], [7, 8, 9]]
    assert tables.num_computed[b] == 16
    tables.release(a)
    assert (tables.block_table[a] == 99).all() and tables.claim(0) == a
    with pytest.raises(RuntimeError, match="more than the 8"):
        tables.add_pages(b, list(range(8)))


def test_media_are_found_from_the_first_uncomputed_and_lose_their_inputs_once_computed() -> None:
    features = [_audio(10, 26), _audio(36, 26), _audio(70, 13)]
    state = _state(list(features))
    assert state.live_features(0, 40) == features[:2]
    state.take_done_features(40)  # the first window is wholly computed, the second only in part
    assert not state.mm_features[0].inputs and state.mm_features[0].identifier == "window-10"
    assert state.mm_features[1].inputs and state.mm_features[2].inputs
    assert features[0].inputs  # the scheduler's copy keeps its inputs (a preempted request is recomputed)
    assert state.live_features(40, 80) == features[1:]
    state.take_done_features(83)
    assert all(not f.inputs for f in state.mm_features)
    assert state.live_features(83, 90) == []
