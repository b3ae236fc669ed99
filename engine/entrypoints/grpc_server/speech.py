"""Spoken answers over gRPC: the `speech` options of a GenerateRequest, SessionConfig or Commit into
SpeechParams, and each answer's AudioDelta (PCM16 24 kHz mono, positioned by its first sample, `last` on the
answer's final audio)."""

from __future__ import annotations

from omnistream.engine.entrypoints.grpc_server.errors import invalid
from omnistream.engine.frontend.outputs import CompletionOutput
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.scheduler.sampling_params import SpeechParams

SAMPLE_RATE = 24000


def speech_params(
    message: pb.GenerateRequest | pb.SessionConfig | pb.Commit, field: str = "speech"
) -> SpeechParams | None:
    """None when the message does not ask for speech; `field` names its `speech` in errors."""
    if not message.HasField("speech"):
        return None
    if message.speech.format not in (pb.AUDIO_FORMAT_UNSPECIFIED, pb.AUDIO_FORMAT_PCM16):
        raise invalid(f"{field}.format: spoken answers are PCM16 only")
    return SpeechParams(voice=message.speech.voice or "ethan", format="pcm16")


class AudioSent:
    """What of one answer's audio was sent."""

    def __init__(self) -> None:
        self.num_bytes = 0
        self.done = False

    def has_news(self, sample: CompletionOutput) -> bool:
        return len(sample.audio) > self.num_bytes or (
            sample.audio_finish_reason is not None and not self.done
        )

    def delta(self, sample: CompletionOutput) -> pb.AudioDelta | None:
        """The audio not yet sent (and whether it is the last); None when there is none."""
        if not self.has_news(sample):
            return None
        data, first = sample.audio[self.num_bytes :], self.num_bytes // 2
        self.num_bytes, self.done = len(sample.audio), sample.audio_finish_reason is not None
        return pb.AudioDelta(data=data, sample_rate=SAMPLE_RATE, first_sample=first, last=self.done)

    def cut(self) -> pb.AudioDelta | None:
        """An empty last piece for audio stopped before its end (a cancelled turn); None if none is owed."""
        if not self.num_bytes or self.done:
            return None
        self.done = True
        return pb.AudioDelta(sample_rate=SAMPLE_RATE, first_sample=self.num_bytes // 2, last=True)
