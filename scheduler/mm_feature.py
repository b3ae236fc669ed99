"""A media item as the scheduler sees it: where its embedding rows sit and what the encoder needs.

The scheduler reads only `identifier`, `offset` and `length`; `inputs`/`options` travel untouched
to the model runner, which runs the encoder on them.
"""

from __future__ import annotations

import msgspec

from omnistream.scheduler.tensor_data import TensorData


class MultiModalFeature(msgspec.Struct, kw_only=True):
    modality: str  # "audio", "image", "video" or "video_audio" (a video interleaved with its soundtrack)
    identifier: str  # content hash of the item and of what shapes its features: the encoder-cache key
    offset: int  # position of its first placeholder token in the request's token sequence
    length: int  # number of placeholder positions it fills (= its encoder output rows)
    inputs: dict[str, TensorData] = {}  # processed encoder inputs (log-mel, pixel values, grids, masks)
    options: dict[str, int | float | bool] = {}  # encoder options, e.g. the audio attention window

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, start: int, end: int) -> bool:
        return self.offset < end and start < self.end
