"""Spoken turns of live sessions in the scheduler (fake lane): a committed turn's talker prompt holds every
user turn of the session (no system or assistant rows) and its media's thinker rows are kept from the moment
they are appended; each turn takes a voice and frees it with its talker blocks when its speech ends or the turn
is cancelled, while the session's kept rows are released only when the session ends; a frame in flight when a
turn was cancelled never reaches the next turn, which has the same id."""

from __future__ import annotations

from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.outputs import ModelRunnerOutput
from omnistream.scheduler.request import Request, RequestStatus
from omnistream.scheduler.sampling_params import SamplingParams, SpeechParams
from omnistream.scheduler.speech_outputs import SpeechFrame
from tests.scheduler.speech_fake import ASSISTANT, EOS, IM_END, IM_START, NL, USER, FakeLane, make_scheduler

SYSTEM = [IM_START, 8948, NL, 7, IM_END, NL]
ASK = [IM_END, NL, IM_START, ASSISTANT, NL]  # what a commit appends
AUDIO = [151669, 151675, 151675, 151675, 151670]


def _open(scheduler, req_id: str = "s") -> None:
    scheduler.add_request(Request(req_id, list(SYSTEM), SamplingParams(max_tokens=1), [EOS], arrival_time=0.0,
                                  open_input=True))


def _spoken(max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=3, speech=SpeechParams(voice="chelsie"))


def _steps(fake: FakeLane, n: int) -> None:
    for _ in range(n):
        fake.step()


def test_a_turn_speaks_every_user_turn_and_its_audio_rows_are_kept_as_they_come():
    scheduler = make_scheduler()
    speech = scheduler.speech
    _open(scheduler)
    fake = FakeLane(scheduler, {"s": [10, 11]}, {"s": 3})
    start = len(SYSTEM) + 3
    clip = MultiModalFeature(modality="audio", identifier="clip", offset=start + 1, length=3)
    scheduler.append_input("s", [IM_START, USER, NL] + AUDIO, [clip])
    fake.step()
    assert fake.schedules[-1].speech.capture == {"s": [start + 1, start + 2, start + 3]}
    scheduler.commit_turn("s", ASK, _spoken())
    _steps(fake, 8)
    turn1 = (IM_START, USER, NL, *AUDIO, IM_END, NL)
    assert fake.rows_read["s"][0][1][0] == turn1 and speech.requests == {}
    assert fake.audio_finish["s"] == "stop" and fake.audio["s"] == b"ab" * 3 and fake.text_finish["s"] == "stop"
    assert len(speech.free_blocks) == 64 and len(speech.free_slots) == 4
    # the next turn: the answer (10 11 EOS) is closed and the user speaks again
    scheduler.append_input("s", [IM_END, NL, IM_START, USER, NL, 8, 9])
    scheduler.commit_turn("s", ASK, _spoken())
    _steps(fake, 8)
    assert fake.rows_read["s"][0][1][0] == turn1 + (IM_START, USER, NL, 8, 9, IM_END, NL)  # no assistant rows
    assert fake.audio["s"] == b"ab" * 6 and not any(s.speech and s.speech.released_req_ids for s in fake.schedules)
    scheduler.finish_requests("s", RequestStatus.FINISHED_ABORTED)
    assert scheduler.schedule().speech.released_req_ids == ["s"] and not speech.sessions


def test_cancel_stops_the_speech_and_a_frame_in_flight_never_reaches_the_next_turn():
    scheduler = make_scheduler()
    speech = scheduler.speech
    _open(scheduler)
    fake = FakeLane(scheduler, {"s": list(range(10, 40))}, {})
    scheduler.append_input("s", [IM_START, USER, NL, 5])
    scheduler.commit_turn("s", ASK, _spoken(max_tokens=30))
    while not fake.steps or fake.steps[-1] != ["s"]:
        fake.step()
    output = scheduler.schedule()  # a talker step of the first turn is in flight...
    assert [step.req_id for step in output.speech.steps] == ["s"]
    assert scheduler.cancel_turn("s")  # ...when the user barges in
    assert not speech.requests and len(speech.free_blocks) == 64 and len(speech.free_slots) == 4
    scheduler.append_input("s", [IM_END, NL, IM_START, USER, NL, 6])
    scheduler.commit_turn("s", ASK, _spoken())
    frame = SpeechFrame(req_id="s", codes=[7] * 16, pcm=b"ab")
    stale = ModelRunnerOutput(sampled_req_ids=[], sampled_token_ids=[], logprobs=[], speech=[frame])
    outputs = scheduler.update_from_output(output, stale)
    assert speech.requests["s"].frames == [] and not any(o.new_audio for o in outputs)
    assert scheduler.schedule().speech.finished_req_ids == ["s"]  # the runner drops the first turn's voice
    assert not scheduler.cancel_turn("missing")


def test_input_rolled_back_drops_the_rows_kept_past_it_before_new_input_is_captured():
    """A segment discarded before its commit (or the input after a truncated answer) leaves the context: the
    runner is told to drop the rows kept past the cut, before the rows of input appended after it."""
    scheduler = make_scheduler()
    _open(scheduler)
    fake = FakeLane(scheduler, {}, {})
    start = len(SYSTEM) + 3
    scheduler.append_input("s", [IM_START, USER, NL])
    clip = MultiModalFeature(modality="audio", identifier="clip", offset=start + 1, length=3)
    scheduler.append_input("s", AUDIO, [clip])
    fake.step()
    assert fake.schedules[-1].speech.capture == {"s": [start + 1, start + 2, start + 3]}
    scheduler.rollback_input("s", start)  # the clip was a false start
    again = MultiModalFeature(modality="audio", identifier="again", offset=start + 1, length=2)
    scheduler.append_input("s", AUDIO[:3] + AUDIO[-1:], [again])
    pending = MultiModalFeature(modality="audio", identifier="pending", offset=start + 4, length=1)
    scheduler.append_input("s", AUDIO[:2] + AUDIO[-1:], [pending])
    scheduler.rollback_input("s", start + 4)  # the last one too, before any step saw it
    speech = scheduler.schedule().speech
    assert speech.rolled_back == {"s": start} and speech.capture == {"s": [start + 1, start + 2]}
    assert scheduler.schedule().speech is None  # nothing left to tell the runner
