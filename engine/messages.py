"""Messages from the front ends into the engine core (msgspec Structs: they will cross processes)."""

from __future__ import annotations

import msgspec

from omnistream.scheduler.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
