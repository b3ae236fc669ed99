"""The talker's input rows, as HF's `generate` builds them: user turns, the 9 assistant rows, one row per
frame.

A user-turn position becomes `text_projection(thinker embedding)`, or `hidden_projection(thinker hidden state
after layer accept_hidden_layer)` at a media placeholder. The assistant header becomes 9 rows, each a text row
plus a codec row; then every frame's row is its 16 code embeddings plus the next text row (a reply token,
tts_eos, tts_pad).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from omnistream.engine.checkpoint.speech_config import SpeechConfig
from omnistream.engine.model_executor.models.talker import Talker
from omnistream.scheduler import speech as speech_schedule


class TtsRows(NamedTuple):
    """The projected thinker embeddings of <tts_text_bos>, <tts_text_eod> and <tts_pad>, each [H]."""

    bos: torch.Tensor
    eos: torch.Tensor
    pad: torch.Tensor


def tts_token_ids(config: SpeechConfig) -> list[int]:
    """Thinker ids whose embeddings `tts_rows` takes, in its order (bos, eos, pad)."""
    return [config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]


def tts_rows(talker: Talker, embeds: torch.Tensor) -> TtsRows:
    """embeds [3, Ht]: the thinker's embeddings of `tts_token_ids`."""
    bos, eos, pad = talker.text_projection(embeds)
    return TtsRows(bos, eos, pad)


def speaker_id(config: SpeechConfig, voice: str) -> int:
    """The talker-vocabulary id of a voice (case-insensitive); ValueError listing the checkpoint's voices."""
    speakers = config.talker.speakers
    if voice.lower() not in speakers:
        raise ValueError(f"unknown voice {voice!r}; this checkpoint speaks {sorted(speakers)}")
    return speakers[voice.lower()]


def user_turn_positions(token_ids: list[int], config: SpeechConfig) -> list[int]:
    """Positions of the prompt that the talker keeps (user turns only; the rule is scheduler/speech.py's)."""
    return speech_schedule.user_turn_positions(token_ids, config.im_start_token_id, config.user_token_id)


def user_rows(
    talker: Talker, text_embeds: torch.Tensor, media_mask: torch.Tensor, media_hidden: torch.Tensor
) -> torch.Tensor:
    """Rows [n, H] of user-turn positions: text_embeds [n, Ht] (thinker embeddings; unused at media
    positions), media_mask [n] bool, media_hidden [m, Ht] (thinker hidden states at the m media positions, in
    order)."""
    if int(media_mask.sum()) != media_hidden.shape[0]:
        raise ValueError(f"{int(media_mask.sum())} media positions but {media_hidden.shape[0]} hidden rows")
    rows = text_embeds.new_empty(text_embeds.shape[0], talker.config.text.hidden_size)
    rows[~media_mask] = talker.text_projection(text_embeds[~media_mask])
    if media_hidden.shape[0]:
        rows[media_mask] = talker.hidden_projection(media_hidden)
    return rows


def assistant_rows(
    talker: Talker, config: SpeechConfig, embeds: torch.Tensor, tts: TtsRows, speaker: int
) -> torch.Tensor:
    """The 9 rows [9, H] after the user turns. embeds [4, Ht]: thinker embeddings of <|im_start|>,
    `assistant`, `\n` and the first reply token y0. Text: header ×3, tts_pad ×4, tts_bos, y0; codec: 0 ×3,
    nothink, think_bos, think_eos, speaker, codec pad, codec bos."""
    talker_config = config.talker
    projected = talker.text_projection(embeds)
    text = torch.cat((projected[:3], tts.pad.expand(4, -1), tts.bos.unsqueeze(0), projected[3:4]))
    codec_ids = [
        talker_config.codec_nothink_id,
        talker_config.codec_think_bos_id,
        talker_config.codec_think_eos_id,
        speaker,
        talker_config.codec_pad_id,
        talker_config.codec_bos_id,
    ]
    codec = talker.embed_codec(torch.tensor(codec_ids, device=embeds.device))
    return text + torch.cat((codec.new_zeros(3, codec.shape[-1]), codec))


def frame_rows(
    talker: Talker, c0: torch.Tensor, residual_embeds: torch.Tensor, text_rows: torch.Tensor
) -> torch.Tensor:
    """The talker's next input rows [B, H] after frames with codebook 0 `c0` [B] and the code predictor's
    residual embeddings [B, H]: their code embeddings plus the next text rows [B, H]."""
    return talker.embed_codec(c0) + residual_embeds + text_rows
