"""A feature's layout survives its trip through MultiModalFeature.options (msgspec included) for every kind, a
video with its audio opens with two tokens, and a feature whose options lack its layout is refused by name."""

from __future__ import annotations

import msgspec
import pytest

from omnistream.scheduler import media_layout as layouts
from omnistream.scheduler.mm_feature import MultiModalFeature


def _feature(modality: str, options: dict) -> MultiModalFeature:
    feature = MultiModalFeature(modality=modality, identifier="x" * 16, offset=3, length=4, options=options)
    return msgspec.msgpack.decode(msgspec.msgpack.encode(feature), type=MultiModalFeature)


@pytest.mark.parametrize(
    "modality, options, expected",
    [
        ("audio", {"window_frames": 800}, layouts.MediaLayout(kind=layouts.AUDIO)),
        ("audio", dict(layouts.SOUNDTRACK_OPTIONS), layouts.MediaLayout(kind=layouts.SOUNDTRACK)),
        ("image", layouts.image_options((1, 6, 8)), layouts.MediaLayout(kind=layouts.IMAGE, grid_thw=(1, 6, 8))),
        (
            "video",
            layouts.video_options((3, 4, 4), 2.0),
            layouts.MediaLayout(kind=layouts.VIDEO, grid_thw=(3, 4, 4), second_per_grid=2.0),
        ),
        (
            "video_audio",
            {"window_frames": 200, **layouts.video_options((2, 4, 6), 0.5)},
            layouts.MediaLayout(kind=layouts.VIDEO_AUDIO, grid_thw=(2, 4, 6), second_per_grid=0.5),
        ),
        (
            "video",
            layouts.video_slice_options(5, (1, 4, 4), 1.0, with_audio=True),
            layouts.MediaLayout(
                kind=layouts.VIDEO_SLICE, grid_thw=(1, 4, 4), second_per_grid=1.0, slice_index=5, with_audio=True
            ),
        ),
    ],
)
def test_layouts_round_trip_through_the_feature_options(modality, options, expected):
    assert layouts.layout_of(_feature(modality, options)) == expected


def test_a_video_with_its_audio_opens_with_two_tokens():
    opening = {
        kind: layouts.MediaLayout(kind=kind).num_opening_tokens
        for kind in (layouts.AUDIO, layouts.IMAGE, layouts.VIDEO, layouts.VIDEO_AUDIO, layouts.SOUNDTRACK)
    }
    assert opening == {"audio": 1, "image": 1, "video": 1, "video_audio": 2, "soundtrack": 2}
    silent, heard = (layouts.MediaLayout(kind=layouts.VIDEO_SLICE, with_audio=w) for w in (False, True))
    assert (silent.num_opening_tokens, heard.num_opening_tokens) == (1, 2)


def test_a_feature_without_its_layout_is_refused_by_name():
    with pytest.raises(ValueError, match="option 'second_per_grid' is not set"):
        layouts.layout_of(_feature("video", layouts.image_options((2, 4, 4))))
