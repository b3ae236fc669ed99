"""Media features: a piece of a split item names its rows inside the item's encoder output, and a piece that
would reach past that output is refused (also when it arrives as msgpack)."""

from __future__ import annotations

import msgspec
import pytest

from omnistream.scheduler.mm_feature import MultiModalFeature


def test_pieces_name_their_rows_and_survive_msgpack():
    whole = MultiModalFeature(modality="audio", identifier="w", offset=5, length=26)
    piece = MultiModalFeature(modality="audio", identifier="w", offset=40, length=13, row_offset=13, encoder_rows=26)
    assert (whole.num_encoder_rows, piece.num_encoder_rows, piece.end) == (26, 26, 53)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(piece), type=MultiModalFeature)
    assert decoded == piece


@pytest.mark.parametrize("fields", [dict(length=13, row_offset=14, encoder_rows=26), dict(length=3, row_offset=1),
                                    dict(length=-1), dict(length=2, row_offset=-1, encoder_rows=4)])
def test_rows_outside_the_item_are_refused(fields):
    with pytest.raises(ValueError, match="rows|>= 0"):
        MultiModalFeature(modality="audio", identifier="w", offset=0, **fields)
    raw = msgspec.msgpack.encode({"modality": "audio", "identifier": "w", "offset": 0, **fields})
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(raw, type=MultiModalFeature)
