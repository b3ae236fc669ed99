"""What the model runner remembers about one request between steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    @classmethod
    def from_new(cls, data: NewRequestData) -> "RunnerRequestState":
        return cls(
            req_id=data.req_id,
            token_ids=list(data.token_ids),
            num_prompt_tokens=data.num_prompt_tokens,
            sampling_params=data.sampling_params,
            block_ids=list(data.block_ids),
            num_computed_tokens=data.num_computed_tokens,
        )

    def generator(self, engine_generator: torch.Generator) -> torch.Generator:
        """A seeded request draws from (seed, output index) so preemption and batching never change it."""
        seed = self.sampling_params.seed
        if seed is None:
            return engine_generator
        return torch.Generator().manual_seed((seed * 1_000_003 + len(self.output_token_ids)) % 2**63)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
