"""What the model runner remembers about one request between steps (its page ids and computed-token count live in
the slot tables): its tokens, media, sampling parameters and where its M-RoPE ids come from."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch

from omnistream.multimodal.tensor_codec import from_tensor_data
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.outputs import NewRequestData
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.tensor_data import PositionSegment


@dataclass
class RunnerRequestState:
    """Positions: tokens inside a segment take its explicit ids; any other token p (text, decoded output) takes
    p + delta, delta fixed by the segments before it so that text continues from the largest id so far plus one
    (as in HF). The deltas are settled when a segment arrives, so a step costs nothing per text token."""

    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    mm_features: list[MultiModalFeature]
    segment_starts: list[int] = field(default_factory=list)  # of every segment, ascending
    segment_ends: list[int] = field(default_factory=list)
    segment_ids: list[np.ndarray] = field(default_factory=list)  # explicit ids [3, n] float32
    segment_deltas: list[float] = field(default_factory=list)  # delta of the text after each segment
    max_position: float = -1.0  # the largest id up to the last segment's end
    num_done_features: int = 0  # mm_features[:n] are wholly computed (their inputs dropped)

    @classmethod
    def from_new(cls, data: NewRequestData) -> "RunnerRequestState":
        state = cls(
            req_id=data.req_id,
            token_ids=list(data.token_ids),
            num_prompt_tokens=data.num_prompt_tokens,
            sampling_params=data.sampling_params,
            mm_features=list(data.mm_features),
        )
        state.add_segments(data.position_segments)
        return state

    def add_segments(self, segments: list[PositionSegment]) -> None:
        """Take explicit ids of tokens at or after the end of every segment so far."""
        for segment in segments:
            ids = from_tensor_data(segment.positions).numpy().astype(np.float32, copy=False)
            end = self.segment_ends[-1] if self.segment_ends else 0
            if segment.start < end:
                raise ValueError(f"request {self.req_id}: a position segment at token {segment.start} overlaps the "
                                 f"one ending at {end}")
            if segment.start > end:  # the text before it: ids up to start - 1 + delta
                self.max_position = max(self.max_position, segment.start - 1 + self.text_delta(end))
            if ids.size:
                self.max_position = max(self.max_position, float(ids.max()))
            self.segment_starts.append(segment.start)
            self.segment_ends.append(segment.start + ids.shape[1])
            self.segment_ids.append(ids)
            self.segment_deltas.append(self.max_position + 1 - self.segment_ends[-1])

    def text_delta(self, token: int) -> float:
        """delta of a text token at index `token` (id = token + delta)."""
        index = bisect_right(self.segment_ends, token)
        return self.segment_deltas[index - 1] if index else 0.0

    def explicit_positions(self, start: int, end: int) -> np.ndarray | None:
        """M-RoPE ids [3, end - start] (float32) of tokens start..end-1 when a segment reaches into them; None
        when they are all text (ids token + text_delta(start))."""
        first = bisect_right(self.segment_ends, start)  # the first segment that ends after `start`
        if first == len(self.segment_starts) or self.segment_starts[first] >= end:
            return None
        out = np.empty((3, end - start), dtype=np.float32)
        token = start
        for index in range(first, len(self.segment_starts)):
            seg_start, seg_end = self.segment_starts[index], self.segment_ends[index]
            if seg_start >= end:
                break
            if seg_start > token:
                out[:, token - start : seg_start - start] = np.arange(token, seg_start) + self.text_delta(token)
            lo, hi = max(seg_start, start), min(seg_end, end)
            out[:, lo - start : hi - start] = self.segment_ids[index][:, lo - seg_start : hi - seg_start]
            token = hi
        if token < end:
            out[:, token - start :] = np.arange(token, end) + self.text_delta(token)
        return out

    def positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE ids [3, end - start] (float32) of tokens start..end-1, text ones included."""
        ids = self.explicit_positions(start, end)
        if ids is None:
            ids = np.broadcast_to(np.arange(start, end, dtype=np.float32) + self.text_delta(start), (3, end - start))
        return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.float32))

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

