"""The speech lane's place in the engine core: the scheduler's view of it (voices, ids, limits) from the
checkpoint's speech config and the engine's flags. The executor loads the models and runs the lane's steps."""

from __future__ import annotations

from omnistream.engine.checkpoint.speech_config import SpeechConfig
from omnistream.engine.engine_config import EngineConfig
from omnistream.scheduler.speech import SpeechLaneConfig


def speech_lane_config(speech: SpeechConfig | None, config: EngineConfig) -> SpeechLaneConfig | None:
    """None when no speech models are loaded: every request for audio is then refused with a clear error."""
    if speech is None:
        return None
    return SpeechLaneConfig(
        speakers=dict(speech.talker.speakers),
        num_talker_blocks=config.talker_kv_blocks(),
        block_size=config.block_size,
        max_num_voices=config.max_num_voices,
        max_audio_frames=config.max_audio_frames,
        first_packet_frames=config.speech_first_packet_frames,
        codec_eos_id=speech.talker.codec_eos_token_id,
        tts_eos_id=speech.tts_eos_token_id,
        tts_pad_id=speech.tts_pad_token_id,
        im_start_id=speech.im_start_token_id,
        user_id=speech.user_token_id,
        assistant_id=speech.assistant_token_id,
    )
