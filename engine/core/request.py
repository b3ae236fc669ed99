"""Messages from the front ends into the engine core (msgspec Structs: they will cross processes)."""

from __future__ import annotations

import msgspec

from omnistream.multimodal.processor import ProcessedPrompt
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.tensor_data import PositionSegment


class EngineCoreRequest(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    mm_features: list[MultiModalFeature] = []
    position_segments: list[PositionSegment] = []  # explicit M-RoPE ids; none for text-only prompts

    @classmethod
    def from_processed(
        cls, request_id: str, processed: ProcessedPrompt, sampling_params: SamplingParams, arrival_time: float
    ) -> EngineCoreRequest:
        return cls(
            request_id=request_id,
            prompt_token_ids=processed.token_ids,
            sampling_params=sampling_params,
            arrival_time=arrival_time,
            mm_features=processed.mm_features,
            position_segments=processed.position_segments,
        )
