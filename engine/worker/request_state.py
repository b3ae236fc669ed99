"""What the model runner remembers about one request between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import torch

from omnistream.engine.model_executor.attention.kv_views import block_runs
from omnistream.multimodal.tensor_codec import from_tensor_data
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.outputs import NewRequestData
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.tensor_data import PositionSegment


@dataclass
class RunnerRequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    mm_features: list[MultiModalFeature]
    pending_segments: dict[int, torch.Tensor] = field(default_factory=dict)  # start -> [3, n] explicit ids
    resolved_positions: torch.Tensor = field(default_factory=lambda: _positions_buffer(64))  # [:, :K]: ids of tokens 0..K-1
    num_resolved: int = 0  # K; the buffer grows by doubling, so resolving new tokens never copies the old ones
    max_position: float = -1.0  # the largest id resolved so far
    num_done_features: int = 0  # mm_features[:n] are wholly computed (their inputs dropped)
    block_runs: list[tuple[int, int]] = field(default_factory=list)  # block_ids as (first, count) runs

    def __post_init__(self) -> None:
        self.block_runs = block_runs(self.block_ids)

    def add_blocks(self, new_block_ids: list[int]) -> None:
        """Extend the block table (and its runs, incrementally)."""
        self.block_ids.extend(new_block_ids)
        for block_id in new_block_ids:
            runs = self.block_runs
            if runs and runs[-1][0] + runs[-1][1] == block_id:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((block_id, 1))

    @classmethod
    def from_new(cls, data: NewRequestData) -> "RunnerRequestState":
        state = cls(
            req_id=data.req_id,
            token_ids=list(data.token_ids),
            num_prompt_tokens=data.num_prompt_tokens,
            sampling_params=data.sampling_params,
            block_ids=list(data.block_ids),
            num_computed_tokens=data.num_computed_tokens,
            mm_features=list(data.mm_features),
        )
        state.add_segments(data.position_segments)
        return state

    def add_segments(self, segments: list[PositionSegment]) -> None:
        for segment in segments:
            self.pending_segments[segment.start] = from_tensor_data(segment.positions).to(torch.float32)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE ids [3, end - start] (float32) of tokens start..end-1: explicit segments where given,
        otherwise consecutive from the largest id so far plus one (text and decoded tokens, as in HF)."""
        while self.num_resolved < end:
            known = self.num_resolved
            segment = self.pending_segments.pop(known, None)
            if segment is None:
                following = [s for s in self.pending_segments if s > known]
                run = min([end, *following]) - known
                segment = (torch.arange(run, dtype=torch.float32) + self.max_position + 1).expand(3, -1)
            self._append_positions(segment)
            self.max_position = max(self.max_position, float(segment.max()))
        return self.resolved_positions[:, start:end]

    def _append_positions(self, segment: torch.Tensor) -> None:
        needed = self.num_resolved + segment.shape[1]
        if needed > self.resolved_positions.shape[1]:
            grown = _positions_buffer(max(needed, 2 * self.resolved_positions.shape[1]))
            grown[:, : self.num_resolved] = self.resolved_positions[:, : self.num_resolved]
            self.resolved_positions = grown
        self.resolved_positions[:, self.num_resolved : needed] = segment
        self.num_resolved = needed

    def take_done_features(self, computed: int) -> None:
        """Media wholly computed (up to token `computed`) are never encoded again by this runner state (a
        preempted request comes back as a new one): keep them without their encoder inputs."""
        features = self.mm_features
        while self.num_done_features < len(features) and features[self.num_done_features].end <= computed:
            feature = features[self.num_done_features]
            if feature.inputs:
                features[self.num_done_features] = msgspec.structs.replace(feature, inputs={})
            self.num_done_features += 1

    def live_features(self, start: int, end: int) -> list[MultiModalFeature]:
        """The media overlapping tokens [start, end), for start >= the computed tokens already taken."""
        result = []
        for index in range(self.num_done_features, len(self.mm_features)):
            feature = self.mm_features[index]
            if feature.offset >= end:
                break
            if feature.overlaps(start, end):
                result.append(feature)
        return result


def _positions_buffer(columns: int) -> torch.Tensor:
    """An M-RoPE id buffer [3, columns] that is a normal tensor even when made inside the runner's inference
    mode, so positions() can also fill it outside (an inference tensor refuses in-place updates there)."""
    with torch.inference_mode(False):
        return torch.empty(3, columns)
