"""TM-RoPE 3-D position ids (temporal, height, width) of the thinker's prompt, built block by block.

The one implementation: `MRopeBuilder` extends a running sequence (streamed audio windows, text, media) and
`mrope_positions_for_prompt` scans a whole expanded prompt with the same builder. Bit-identical to HF-5.24
`get_rope_index` (float32 positions, including its rounding order). Does not expand placeholders or run models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omnistream.multimodal.placeholders import (
    AudioItem,
    ImageItem,
    MediaItem,
    MultimodalTokenIds,
    VideoItem,
    _check_grid,
)

# What the last block was. HF starts a block at `previous block start + previous length` in exactly two places
# (the item's start token(s) after the text before it, and the item's content after its start token(s)); every
# other block starts at max(last block) + 1. Both are float32 sums; the order of operations is kept as HF's even
# though integer steps never round differently, so exactness does not rest on that argument.
_TEXT, _START, _AUDIO, _VISION, _END = "text", "start", "audio", "vision", "end"
_LIVE_VIDEO = "live video"  # a video (with or without its audio) given slice by slice
_RUNS = (_TEXT, _START, _AUDIO, _END)  # arange blocks that a repeated call of the same kind extends


class MRopeBuilder:
    """Position ids of a growing token sequence. Every `add_*` returns the new tokens' positions, [3, n] float32.

    Call order mirrors the tokens: `add_text` for text and any other token (im_start, role, newline, ...),
    `add_start(n)` for an item's opening token(s) (`<|audio_start|>`, `<|vision_start|>`, or both for a video
    with its audio), one content call, then `add_end(n)` for the closing token(s). Repeated calls of the same
    kind extend one block: `add_audio(k); add_audio(m)` gives exactly `add_audio(k + m)`, so a live audio stream
    can append each encoded window as it comes and end with `add_end()` when the turn is committed.
    A live video is given the same way, one temporal slice and one run of its audio at a time, in the
    order of its tokens (`add_video_slice`, `add_soundtrack`): the result equals `add_video` or
    `add_video_with_audio` of the whole video.
    """

    def __init__(self, *, spatial_merge_size: int = 2, position_id_per_seconds: float = 13.0) -> None:
        self.spatial_merge_size = spatial_merge_size
        self.position_id_per_seconds = float(position_id_per_seconds)
        self.num_tokens = 0
        self._kind: str | None = None  # kind of the last block, None before the first
        self._base = torch.zeros((), dtype=torch.float32)  # first position of the last block if it is a run
        self._count = 0  # tokens in that run
        self._last_max = torch.zeros((), dtype=torch.float32)  # max of the last block when it is not a run
        self._max = torch.full((), float("-inf"), dtype=torch.float32)  # max over everything so far
        self._live_start = torch.zeros((), dtype=torch.float32)  # first position of the live video's block
        self._live_audio = 0  # its audio tokens so far
        self._live_tail_empty = True  # no video column since its last audio token

    # ---- block starts -------------------------------------------------------------------------------------

    def _start_for(self, kind: str) -> torch.Tensor:
        if self._kind is None:
            return torch.zeros((), dtype=torch.float32)
        content = (_AUDIO, _VISION, _LIVE_VIDEO)
        if (self._kind == _TEXT and kind == _START) or (self._kind == _START and kind in content):
            return self._base + self._count
        return self._last_block_max() + 1

    def _last_block_max(self) -> torch.Tensor:
        if self._kind in _RUNS:
            return self._base + (self._count - 1)
        return self._last_max

    def _record(self, positions: torch.Tensor) -> torch.Tensor:
        self.num_tokens += positions.shape[1]
        if positions.shape[1]:
            self._max = torch.maximum(self._max, positions.max())
        return positions

    def _run(self, kind: str, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"number of tokens must be >= 0, got {n}")
        if n == 0:
            return torch.empty((3, 0), dtype=torch.float32)
        if self._kind != kind:
            self._base = self._start_for(kind)
            self._count = 0
            self._kind = kind
        row = torch.arange(self._count, self._count + n, dtype=torch.float32) + self._base
        self._count += n
        return self._record(row.expand(3, n).contiguous())

    def _block(self, positions: torch.Tensor, last_block_max: torch.Tensor) -> torch.Tensor:
        self._kind = _VISION
        self._last_max = last_block_max
        return self._record(positions)

    # ---- public -------------------------------------------------------------------------------------------

    def add_text(self, n: int) -> torch.Tensor:
        """Text tokens (and any token that does not open or close a media item): consecutive on all rows."""
        return self._run(_TEXT, n)

    def add_start(self, n: int = 1) -> torch.Tensor:
        """An item's opening token(s): 1 for audio, image or silent video, 2 (vision_start, audio_start) for a
        video with its audio. Consecutive, distinct positions."""
        return self._run(_START, n)

    def add_end(self, n: int = 1) -> torch.Tensor:
        """An item's closing token(s), 1 or 2 like `add_start`; they start at max(last block) + 1."""
        return self._run(_END, n)

    def add_audio(self, num_tokens: int) -> torch.Tensor:
        """Audio embeddings: consecutive on all rows (13 per second). Repeated calls continue the same clip."""
        return self._run(_AUDIO, num_tokens)

    def add_image(self, grid_thw: Sequence[int]) -> torch.Tensor:
        """An image's merged patch grid; its temporal step is position_id_per_seconds (grid_t is 1 in practice)."""
        start = self._start_for(_VISION)
        t = torch.arange(int(grid_thw[0])) * 1 * self.position_id_per_seconds
        positions = self._vision(start, t.float(), grid_thw, "image")
        return self._block(positions, positions.max())

    def add_video(self, grid_thw: Sequence[int], second_per_grid: float) -> torch.Tensor:
        """A video without its audio: temporal id start + t·second_per_grid·position_id_per_seconds (float)."""
        start = self._start_for(_VISION)
        positions = self._vision(start, self._video_times(grid_thw, second_per_grid), grid_thw, "video")
        return self._block(positions, positions.max())

    def add_video_with_audio(
        self, grid_thw: Sequence[int], second_per_grid: float, num_audio_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A video and its soundtrack, merged by temporal id (ties to video). Returns positions [3, nV + nA] and
        `is_video` [nV + nA] bool in this merged order.

        HF merges in float32 with the start position added, its processor writes the pads in float64 without it;
        the two orders agree unless some ti·second_per_grid·13 lands within float32 rounding of an integer
        (e.g. second_per_grid 2/7). Like HF, the positions are given in this (model) order regardless.
        """
        if num_audio_tokens < 0:
            raise ValueError(f"num_audio_tokens must be >= 0, got {num_audio_tokens}")
        start = self._start_for(_VISION)
        video = self._vision(start, self._video_times(grid_thw, second_per_grid), grid_thw, "video")
        audio = (torch.arange(num_audio_tokens, dtype=torch.float32) + start).expand(3, -1)
        n_video, n_audio = video.shape[1], num_audio_tokens
        # stable merge of two sorted temporal rows, video first on ties (what HF's token-by-token loop does)
        video_slot = torch.arange(n_video) + torch.searchsorted(audio[0].contiguous(), video[0].contiguous(),
                                                                right=False)
        audio_slot = torch.arange(n_audio) + torch.searchsorted(video[0].contiguous(), audio[0].contiguous(),
                                                                right=True)
        positions = torch.empty((3, n_video + n_audio), dtype=torch.float32)
        positions[:, video_slot] = video
        positions[:, audio_slot] = audio
        is_video = torch.zeros(n_video + n_audio, dtype=torch.bool)
        is_video[video_slot] = True
        # HF's last block is the tail left when the other stream ran out: video columns later than the last
        # audio token, or audio tokens later than the last video slice (a lone column otherwise).
        if n_audio == 0 or video[0, -1] > audio[0, -1]:
            cut = int((video[0] <= audio[0, -1]).sum()) if n_audio else 0
            last_block_max = video[:, cut:].max()
        else:
            last_block_max = audio[0, -1]
        return self._block(positions, last_block_max), is_video

    def add_video_slice(self, index: int, grid_thw: Sequence[int], second_per_grid: float) -> torch.Tensor:
        """Temporal slice `index` (0, 1, ... in order) of a live video whose slices have the patch grid
        `grid_thw` = (1, h, w); call it after `add_start` and between the `add_soundtrack` runs it falls
        between (slice i at time i·second_per_grid·position_id_per_seconds, audio token k at k, ties to video)."""
        start = self._live_block_start()
        times = (torch.tensor([int(index)]) * torch.tensor(float(second_per_grid), dtype=torch.float32)
                 * self.position_id_per_seconds).float()
        positions = self._vision(start, times, grid_thw, "video slice")
        # HF's last block of a video is the video columns after its last audio token
        tail = positions.max()
        self._last_max = tail if self._live_tail_empty else torch.maximum(self._last_max, tail)
        self._live_tail_empty = False
        return self._record(positions)

    def add_soundtrack(self, num_tokens: int) -> torch.Tensor:
        """The next `num_tokens` audio tokens of a live video's soundtrack (audio token k at block start + k)."""
        if num_tokens < 0:
            raise ValueError(f"number of tokens must be >= 0, got {num_tokens}")
        start = self._live_block_start()
        if num_tokens == 0:
            return torch.empty((3, 0), dtype=torch.float32)
        row = torch.arange(self._live_audio, self._live_audio + num_tokens, dtype=torch.float32) + start
        self._live_audio += num_tokens
        self._last_max = row[-1]
        self._live_tail_empty = True
        return self._record(row.expand(3, num_tokens).contiguous())

    def delta(self, num_tokens: int | None = None) -> float:
        """mrope_position_delta = max position + 1 − number of tokens; a decoded token at sequence index n gets
        position n + delta on all three rows. `num_tokens` defaults to the tokens added so far."""
        n = self.num_tokens if num_tokens is None else num_tokens
        if self.num_tokens == 0:
            return float(-n)
        return float(self._max + 1 - n)

    @property
    def max_position(self) -> float:
        return float(self._max)

    # ---- helpers ------------------------------------------------------------------------------------------

    def _live_block_start(self) -> torch.Tensor:
        if self._kind != _LIVE_VIDEO:
            self._live_start = self._start_for(_LIVE_VIDEO)
            self._live_audio = 0
            self._live_tail_empty = True
            self._kind = _LIVE_VIDEO
        return self._live_start

    def _video_times(self, grid_thw: Sequence[int], second_per_grid: float) -> torch.Tensor:
        spg = torch.tensor(float(second_per_grid), dtype=torch.float32)
        return (torch.arange(int(grid_thw[0])) * spg * self.position_id_per_seconds).float()

    def _vision(self, start: torch.Tensor, times: torch.Tensor, grid_thw: Sequence[int], what: str) -> torch.Tensor:
        t, h, w = _check_grid(grid_thw, self.spatial_merge_size, what)
        lh, lw = h // self.spatial_merge_size, w // self.spatial_merge_size
        rows = torch.stack([
            times.view(-1, 1, 1).expand(t, lh, lw).flatten(),
            torch.arange(lh, dtype=torch.float32).view(1, -1, 1).expand(t, lh, lw).flatten(),
            torch.arange(lw, dtype=torch.float32).view(1, 1, -1).expand(t, lh, lw).flatten(),
        ])
        return rows + start


def mrope_positions_for_prompt(
    token_ids: Sequence[int],
    items: Sequence[MediaItem],
    token_ids_config: MultimodalTokenIds,
    *,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 13.0,
) -> tuple[torch.Tensor, float]:
    """Positions [3, N] float32 and the decode delta of an expanded prompt (the output of `expand_placeholders`).

    Scans the tokens like HF `get_rope_index`: each `<|audio_start|>` or `<|vision_start|>` opens the next item
    of its modality (the token after `<|vision_start|>` tells image, video, or video with audio); the run
    lengths come from `items` (k-th item of a modality ↔ k-th occurrence), and everything else is text.
    Raises ValueError where the tokens do not match the items (HF would silently mis-position them).
    """
    ids = token_ids_config
    tokens = list(token_ids)
    queues: dict[type, list[MediaItem]] = {AudioItem: [], ImageItem: [], VideoItem: []}
    for item in items:
        queues[type(item)].append(item)
    taken = {kind: 0 for kind in queues}

    def next_item(kind: type) -> MediaItem:
        if taken[kind] == len(queues[kind]):
            raise ValueError(f"{kind.__name__}: the prompt has more of these than the {len(queues[kind])} given")
        taken[kind] += 1
        return queues[kind][taken[kind] - 1]

    def expect(at: int, count: int, token: int, what: str) -> None:
        if tokens[at:at + count] != [token] * count:
            raise ValueError(f"{what} expected at tokens [{at}, {at + count}) of the expanded prompt")

    builder = MRopeBuilder(spatial_merge_size=spatial_merge_size, position_id_per_seconds=position_id_per_seconds)
    parts: list[torch.Tensor] = []
    cursor = 0
    text_from = 0
    while cursor < len(tokens):
        token = tokens[cursor]
        if token not in (ids.audio_start, ids.vision_start):
            cursor += 1
            continue
        parts.append(builder.add_text(cursor - text_from))
        if token == ids.audio_start:
            audio = next_item(AudioItem)
            n = audio.num_tokens
            expect(cursor + 1, n, ids.audio_pad, f"{n} audio pads")
            expect(cursor + 1 + n, 1, ids.audio_end, "<|audio_end|>")
            parts += [builder.add_start(1), builder.add_audio(n), builder.add_end(1)]
            cursor += n + 2
        else:
            kind = tokens[cursor + 1] if cursor + 1 < len(tokens) else None
            if kind == ids.image_pad:
                image = next_item(ImageItem)
                n = image.num_tokens(spatial_merge_size)
                expect(cursor + 1, n, ids.image_pad, f"{n} image pads")
                parts += [builder.add_start(1), builder.add_image(image.grid_thw)]
            elif kind == ids.video_pad:
                video = next_item(VideoItem)
                if video.has_audio:
                    raise ValueError("a video with audio must be expanded as <|audio_start|> V/A pads <|audio_end|>")
                n = video.num_video_tokens(spatial_merge_size)
                expect(cursor + 1, n, ids.video_pad, f"{n} video pads")
                parts += [builder.add_start(1), builder.add_video(video.grid_thw, video.second_per_grid)]
            elif kind == ids.audio_start:
                video = next_item(VideoItem)
                if not video.has_audio:
                    raise ValueError("a video without audio_mel_frames cannot fill <|vision_start|><|audio_start|>")
                n = video.num_video_tokens(spatial_merge_size) + video.num_audio_tokens
                block = tokens[cursor + 2:cursor + 2 + n]
                if len(block) != n or any(t not in (ids.video_pad, ids.audio_pad) for t in block) or \
                        block.count(ids.video_pad) != video.num_video_tokens(spatial_merge_size):
                    raise ValueError(f"{n} interleaved video/audio pads expected at token {cursor + 2}")
                parts.append(builder.add_start(2))
                parts.append(builder.add_video_with_audio(video.grid_thw, video.second_per_grid,
                                                          video.num_audio_tokens)[0])
                expect(cursor + 2 + n, 1, ids.audio_end, "<|audio_end|>")
                n += 2  # between vision_start and vision_end: audio_start, the pads, audio_end
            else:
                raise ValueError(f"<|vision_start|> at token {cursor} is not followed by an image or video pad")
            expect(cursor + 1 + n, 1, ids.vision_end, "<|vision_end|>")
            parts.append(builder.add_end(2 if kind == ids.audio_start else 1))
            cursor += n + 2
        text_from = cursor
    parts.append(builder.add_text(len(tokens) - text_from))
    for kind, queue in queues.items():
        if taken[kind] != len(queue):
            raise ValueError(f"{kind.__name__}: {len(queue)} given but the prompt has {taken[kind]}")
    return torch.cat(parts, dim=1), builder.delta(len(tokens))
