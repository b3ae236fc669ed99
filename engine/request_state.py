"""What the model runner remembers about one request between steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnistream.engine.tensor_codec import from_tensor_data
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.outputs import NewRequestData
from omnistream.scheduler.sampling_params import SamplingParams


@dataclass
class RunnerRequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    mm_features: list[MultiModalFeature]
    mrope_positions: torch.Tensor | None  # [3, P] float32 for the first P tokens; None: 1-D positions
    mrope_delta: float

    @classmethod
    def from_new(cls, data: NewRequestData) -> "RunnerRequestState":
        return cls(
            req_id=data.req_id,
            token_ids=list(data.token_ids),
            num_prompt_tokens=data.num_prompt_tokens,
            sampling_params=data.sampling_params,
            block_ids=list(data.block_ids),
            num_computed_tokens=data.num_computed_tokens,
            mm_features=list(data.mm_features),
            mrope_positions=None if data.mrope_positions is None else from_tensor_data(data.mrope_positions),
            mrope_delta=data.mrope_delta,
        )

    def generator(self, engine_generator: torch.Generator) -> torch.Generator:
        """A seeded request draws from (seed, output index) so preemption and batching never change it."""
        seed = self.sampling_params.seed
        if seed is None:
            return engine_generator
        return torch.Generator().manual_seed((seed * 1_000_003 + len(self.output_token_ids)) % 2**63)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE ids [3, end - start] (float32) of tokens start..end-1."""
        linear = torch.arange(start, end, dtype=torch.float32)
        if self.mrope_positions is None:
            return linear.expand(3, -1)
        known = self.mrope_positions.shape[1]
        if end <= known:
            return self.mrope_positions[:, start:end]
        tail = (torch.arange(max(start, known), end, dtype=torch.float32) + self.mrope_delta).expand(3, -1)
        return torch.cat([self.mrope_positions[:, start:known], tail], dim=1) if start < known else tail

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
