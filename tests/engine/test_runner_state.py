"""RunnerRequestState keeps per-step work proportional to the new tokens: positions resolved into a growing
buffer, block runs extended incrementally, media looked up from the first one not yet computed, and the
encoder inputs of media wholly computed dropped."""

from __future__ import annotations

import torch

from omnistream.engine.model_executor.attention.kv_views import block_runs
from omnistream.engine.worker.request_state import RunnerRequestState
from omnistream.multimodal.tensor_codec import to_tensor_data
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.tensor_data import PositionSegment


def _audio(offset: int, length: int) -> MultiModalFeature:
    return MultiModalFeature(modality="audio", identifier=f"window-{offset}", offset=offset, length=length,
                             inputs={"input_features": to_tensor_data(torch.randn(128, 100))})


def _state(features: list[MultiModalFeature], block_ids: list[int]) -> RunnerRequestState:
    return RunnerRequestState(req_id="r", token_ids=list(range(1000)), num_prompt_tokens=1000,
                              sampling_params=SamplingParams(), block_ids=block_ids, num_computed_tokens=0,
                              mm_features=features)


def test_positions_resolved_step_by_step_equal_one_resolution() -> None:
    segments = [(5, torch.arange(40, dtype=torch.float32).expand(3, -1) + 100), (300, torch.rand(3, 260) * 50 + 400)]
    whole, stepped = _state([], []), _state([], [])
    for state in (whole, stepped):
        state.add_segments([PositionSegment(start=s, positions=to_tensor_data(p.contiguous())) for s, p in segments])
    want = whole.positions(0, 900).clone()
    got = torch.cat([stepped.positions(start, min(start + 37, 900)) for start in range(0, 900, 37)], dim=1)
    assert torch.equal(got, want)
    assert torch.equal(want[:, 5:45], segments[0][1]) and torch.equal(want[:, 300:560], segments[1][1])
    assert float(want[0, 45]) == 140.0  # text after a segment continues from the largest id so far


def test_block_runs_grow_with_the_table() -> None:
    state = _state([], [7, 8])
    for ids in ([9, 10], [3], [4, 5, 20], [21]):
        state.add_blocks(ids)
        assert state.block_runs == block_runs(state.block_ids)
    assert state.block_runs == [(7, 4), (3, 3), (20, 2)]


def test_media_are_found_from_the_first_uncomputed_and_lose_their_inputs_once_computed() -> None:
    features = [_audio(10, 26), _audio(36, 26), _audio(70, 13)]
    state = _state(list(features), [])
    assert state.live_features(0, 40) == features[:2]
    state.take_done_features(40)  # the first window is wholly computed, the second only in part
    assert not state.mm_features[0].inputs and state.mm_features[0].identifier == "window-10"
    assert state.mm_features[1].inputs and state.mm_features[2].inputs
    assert features[0].inputs  # the scheduler's copy keeps its inputs (a preempted request is recomputed)
    assert state.live_features(40, 80) == features[1:]
    state.take_done_features(83)
    assert all(not f.inputs for f in state.mm_features)
    assert state.live_features(83, 90) == []
