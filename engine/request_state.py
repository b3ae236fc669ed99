"""What the model runner remembers about one request between steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnistream.engine.tensor_codec import from_tensor_data
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
    resolved_positions: torch.Tensor = field(default_factory=lambda: torch.empty(3, 0))  # ids of tokens 0..K-1
    max_position: float = -1.0  # the largest id in resolved_positions

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

    def generator(self, engine_generator: torch.Generator) -> torch.Generator:
        """A seeded request draws from (seed, output index) so preemption and batching never change it."""
        seed = self.sampling_params.seed
        if seed is None:
            return engine_generator
        return torch.Generator().manual_seed((seed * 1_000_003 + len(self.output_token_ids)) % 2**63)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE ids [3, end - start] (float32) of tokens start..end-1: explicit segments where given,
        otherwise consecutive from the largest id so far plus one (text and decoded tokens, as in HF)."""
        known = self.resolved_positions.shape[1]
        pieces = [self.resolved_positions]
        while known < end:
            segment = self.pending_segments.pop(known, None)
            if segment is None:
                following = [s for s in self.pending_segments if s > known]
                run = min([end, *following]) - known
                segment = (torch.arange(run, dtype=torch.float32) + self.max_position + 1).expand(3, -1)
            pieces.append(segment)
            known += segment.shape[1]
            self.max_position = max(self.max_position, float(segment.max()))
        if len(pieces) > 1:
            self.resolved_positions = torch.cat(pieces, dim=1)
        return self.resolved_positions[:, start:end]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
