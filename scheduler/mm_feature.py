"""A media item as the scheduler sees it: where its embedding rows sit and what the encoder needs.

The scheduler reads only `identifier`, `offset` and `length`; `inputs`/`options` travel untouched
to the model runner, which runs the encoder on them. An item whose rows are split over several runs of
placeholders (a live audio window cut by the video frames interleaved with it) is sent as one feature per
run: the pieces share the identifier (one encoder run, one cache entry) and say which rows they take.
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
    row_offset: int = 0  # first encoder-output row it takes (a piece of a split item; 0 otherwise)
    encoder_rows: int = 0  # rows the encoder makes for the whole item when it is a piece; 0: `length`

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 0 or self.row_offset < 0:
            raise ValueError(f"media feature {self.identifier[:12]}: offset, length and row_offset must be >= 0")
        if self.row_offset + self.length > self.num_encoder_rows:
            raise ValueError(f"media feature {self.identifier[:12]}: rows [{self.row_offset}, "
                             f"{self.row_offset + self.length}) exceed the item's {self.num_encoder_rows} rows")

    @property
    def num_encoder_rows(self) -> int:
        """Rows the encoder makes for this feature's item."""
        return self.encoder_rows or self.length

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, start: int, end: int) -> bool:
        return self.offset < end and start < self.end
