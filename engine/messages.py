"""Messages from the front ends into the engine core (msgspec Structs: they will cross processes)."""

from __future__ import annotations

import msgspec

from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.tensor_data import TensorData


class EngineCoreRequest(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    mm_features: list[MultiModalFeature] = []
    mrope_positions: TensorData | None = None  # [3, len(prompt_token_ids)] float32; None for text only
    mrope_delta: float = 0.0
