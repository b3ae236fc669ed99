"""The speech lane's scheduling: the talker is gated on the thinker's reply (first frame one step after the
first text token; y_s, then tts_eos, then tts_pad, as HF), voice slots bound admission, talker preemption
recomputes the same rows without re-sampling, and abort or codec EOS frees blocks and slots."""

from __future__ import annotations

import pytest

from omnistream.scheduler import media_layout
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.request import Request, RequestStatus
from omnistream.scheduler.sampling_params import SamplingParams, SpeechParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.speech_fake import (
    IM_START,
    NL,
    PROMPT,
    TTS_EOS,
    TTS_PAD,
    USER,
    FakeLane,
    lane,
    make_scheduler,
    speaking,
)


def test_the_first_frame_is_sampled_one_step_after_the_first_text_token():
    scheduler = make_scheduler()
    scheduler.add_request(speaking("a"))
    fake = FakeLane(scheduler, {"a": [10, 11, 12]}, {"a": 5})
    fake.step()  # the thinker prefills and samples y0
    assert fake.steps[-1] == [] and scheduler.requests["a"].output_token_ids == [10]
    fake.step()
    assert fake.steps[-1] == ["a"] and fake.audio["a"] == b"ab"
    prompt_row = fake.rows_read["a"][0]
    user_turn = (IM_START, USER, NL, 5, 6, 151645, NL)
    assert prompt_row == ("prompt", (user_turn, (IM_START, 77091, NL, 10), 2302), 0)


@pytest.mark.parametrize(
    "max_tokens, script, text_finish",
    [
        (16, [10, 11, 12], "stop"),  # y0..y2 then EOS: the EOS token is never read, tts_eos takes its step
        (3, [10, 11, 12], "length"),  # cut by max_tokens: the last token is read too, then tts_eos
        (16, [], "stop"),  # a reply that is only EOS: y0 in the prompt, tts_eos at step 1
    ],
)
def test_the_talker_reads_the_reply_then_tts_eos_then_tts_pad(max_tokens, script, text_finish):
    scheduler = make_scheduler()
    scheduler.add_request(speaking("a", max_tokens=max_tokens))
    fake = FakeLane(scheduler, {"a": script}, {"a": 8})
    fake.run()
    spoken = script[1:]  # y0 is in the prompt rows; a stopped reply's EOS is never read
    assert fake.text_ids["a"] == spoken + [TTS_EOS] + [TTS_PAD] * (8 - len(spoken) - 1)
    assert fake.text_finish["a"] == text_finish and fake.audio_finish["a"] == "stop"
    assert fake.audio["a"] == b"ab" * 8
    assert not scheduler.speech.requests and len(scheduler.speech.free_blocks) == 64


def test_text_that_stops_early_keeps_the_request_alive_until_its_audio_ends():
    scheduler = make_scheduler()
    scheduler.add_request(speaking("a"))
    fake = FakeLane(scheduler, {"a": [10]}, {"a": 20})
    for _ in range(4):
        fake.step()
    assert fake.text_finish["a"] == "stop" and "a" not in scheduler.requests
    assert scheduler.has_unfinished_requests() and "a" not in fake.audio_finish
    fake.run()
    assert fake.audio_finish["a"] == "stop" and len(fake.audio["a"]) == 40


def test_voice_slots_bound_the_requests_that_speak_at_once():
    scheduler = make_scheduler(lane(max_num_voices=1))
    scheduler.add_request(speaking("a"))
    scheduler.add_request(speaking("b"))
    fake = FakeLane(scheduler, {"a": [10, 11], "b": [20, 21]}, {"a": 6, "b": 3})
    fake.step()
    assert [r.request_id for r in scheduler.running] == ["a"]
    while "a" not in fake.audio_finish:
        fake.step()
        assert "b" not in [r.request_id for r in scheduler.running] or "a" in fake.audio_finish
    fake.run()
    assert fake.audio_finish == {"a": "stop", "b": "stop"}


def test_a_plain_request_is_not_held_up_by_a_full_voice_pool():
    scheduler = make_scheduler(lane(max_num_voices=1))
    scheduler.add_request(speaking("a"))
    scheduler.add_request(speaking("b"))
    scheduler.add_request(Request("plain", PROMPT, SamplingParams(max_tokens=4), [2], arrival_time=0.0))
    FakeLane(scheduler, {"a": [10, 11], "plain": [30, 31]}, {"a": 50}).step()
    assert {r.request_id for r in scheduler.running} == {"a", "plain"}


def test_talker_preemption_recomputes_the_same_rows_and_never_resamples():
    """Two voices share a talker pool too small for both: the newer is preempted and recomputed, its
    frames, text ids and audio as in a roomy pool."""
    scripts, eos_at = {"a": [10, 11, 12, 13], "b": [20, 21, 22]}, {"a": 12, "b": 12}
    results = []
    for blocks in (64, 9):
        scheduler = make_scheduler(lane(num_talker_blocks=blocks))
        scheduler.add_request(speaking("a"))
        scheduler.add_request(speaking("b"))
        fake = FakeLane(scheduler, scripts, eos_at)
        fake.run()
        results.append((fake, scheduler.speech.num_preemptions))
    (roomy, none), (tight, preemptions) = results
    assert none == 0 and preemptions > 0 == roomy.scheduler.make_stats().num_talker_preemptions
    assert tight.scheduler.make_stats().num_talker_preemptions == preemptions
    assert tight.text_ids == roomy.text_ids and tight.audio == roomy.audio
    for req_id in "ab":
        distinct = list(dict.fromkeys(tight.rows_read[req_id]))
        assert distinct == roomy.rows_read[req_id]


def test_abort_ends_both_lanes_and_frees_blocks_and_the_voice_slot():
    scheduler = make_scheduler(lane(max_num_voices=1))
    scheduler.add_request(speaking("a"))
    fake = FakeLane(scheduler, {"a": [10, 11, 12, 13]}, {"a": 50})
    for _ in range(4):
        fake.step()
    assert scheduler.speech.requests["a"].blocks
    stats = scheduler.make_stats()
    assert stats.num_speaking == 1 and stats.talker_kv_usage > 0
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    stats = scheduler.make_stats()
    assert stats.num_speaking == 0 and stats.talker_kv_usage == 0
    assert not scheduler.has_unfinished_requests()
    assert len(scheduler.speech.free_blocks) == 64 and len(scheduler.speech.free_slots) == 1
    assert scheduler.schedule().speech.finished_req_ids == ["a"]  # the runner drops the voice's state


def test_requests_the_lane_cannot_speak_are_value_errors():
    with pytest.raises(
        ValueError, match=r"unknown voice 'alloy'; this checkpoint speaks \['chelsie', 'ethan'\]"
    ):
        make_scheduler().add_request(speaking("a", voice="alloy"))
    with pytest.raises(ValueError, match="this engine has no talker"):
        Scheduler(SchedulerConfig(max_model_len=64, num_kv_blocks=8)).add_request(speaking("a"))
    with pytest.raises(ValueError, match="ends with the assistant header"):
        make_scheduler().add_request(speaking("a", prompt=PROMPT[:-3]))
    with pytest.raises(ValueError, match="audio format must be one of"):
        SpeechParams(format="ogg")
    with pytest.raises(ValueError, match="stop strings cannot be combined with audio output"):
        SamplingParams(stop=["x"], speech=SpeechParams())


def test_a_talker_only_request_speaks_every_given_token_once_a_voice_is_free():
    scheduler = make_scheduler(lane(max_num_voices=1))
    scheduler.add_request(speaking("a"))
    params = SamplingParams(max_tokens=1, seed=2, speech=SpeechParams(reply_token_ids=[30, 31, 32]))
    scheduler.add_request(Request("tts", PROMPT, params, [2], arrival_time=0.0))
    assert "tts" not in scheduler.requests and scheduler.has_unfinished_requests()
    fake = FakeLane(scheduler, {"a": [10]}, {"a": 3, "tts": 6})
    fake.step()
    assert "tts" not in scheduler.speech.requests  # "a" holds the only voice
    fake.run()
    assert fake.text_ids["tts"] == [31, 32, TTS_EOS] + [TTS_PAD] * 3
    assert fake.rows_read["tts"][0][1][1] == (IM_START, 77091, NL, 30)
    assert fake.text_finish["tts"] == "stop" and fake.audio_finish["tts"] == "stop"
    assert fake.audio["tts"] == b"ab" * 6


def _with_audio(req_id: str, speech: bool = True) -> Request:
    """PROMPT with a 3-row audio clip in its user turn, at positions 10..12."""
    prompt = PROMPT[:9] + [151669, 151675, 151675, 151675, 151670] + PROMPT[9:]
    audio = MultiModalFeature(modality="audio", identifier="clip", offset=10, length=3)
    params = SamplingParams(max_tokens=4, seed=1, speech=SpeechParams() if speech else None)
    return Request(req_id, prompt, params, [2], arrival_time=0.0, mm_features=[audio])


def test_audio_in_a_user_turn_is_read_from_the_thinker_and_never_from_the_prefix_cache():
    scheduler = make_scheduler()
    scheduler.add_request(_with_audio("plain", speech=False))
    FakeLane(scheduler, {"plain": [10, 11]}, {}).run()
    scheduler.add_request(_with_audio("a"))
    fake = FakeLane(scheduler, {"a": [20, 21]}, {"a": 3})
    fake.step()
    fake.step()
    first, second = fake.schedules
    assert first.speech.capture == {"a": [10, 11, 12]} and second.speech.capture == {}
    assert first.num_scheduled_tokens["a"] == 21  # the whole prompt: no prefix-cache hit skips the media
    prompt = fake.rows_read["a"][0][1]
    assert prompt[0][4:7] == (151675,) * 3 and scheduler.speech.requests["a"].media_rows == [4, 5, 6]
    fake.run()
    assert fake.audio_finish["a"] == "stop"


def test_media_without_a_layout_is_refused_naming_the_missing_option():
    video = MultiModalFeature(modality="video", identifier="v", offset=10, length=3)
    request = _with_audio("a")
    request.mm_features = [video]
    with pytest.raises(ValueError, match="option 'grid_t' is not set"):
        make_scheduler().add_request(request)


def test_a_live_video_with_audio_reaches_the_talker_prompt_piece_by_piece_with_its_layout():
    """Pieces of one video (slices and soundtrack runs) keep their order and layouts, at their talker rows;
    the talker reads the thinker's rows at every one of them."""
    prompt = PROMPT[:9] + [151652, 151669] + [151656] * 4 + [151675] * 2 + [151670, 151653] + PROMPT[9:]
    slice_0 = media_layout.video_slice_options(0, (1, 4, 4), 1.0, with_audio=True)
    slice_1 = media_layout.video_slice_options(1, (1, 4, 4), 1.0, with_audio=True)
    pieces = [
        MultiModalFeature(modality="video", identifier="v0", offset=11, length=2, options=slice_0),
        MultiModalFeature(modality="audio", identifier="w", offset=13, length=2,
                          options=dict(media_layout.SOUNDTRACK_OPTIONS)),
        MultiModalFeature(modality="video", identifier="v1", offset=15, length=2, options=slice_1),
    ]
    params = SamplingParams(max_tokens=4, seed=1, speech=SpeechParams())
    scheduler = make_scheduler()
    scheduler.add_request(Request("a", prompt, params, [2], arrival_time=0.0, mm_features=pieces[::-1]))
    fake = FakeLane(scheduler, {"a": [20, 21]}, {"a": 2})
    fake.step()
    fake.step()
    talker_prompt = fake.schedules[1].speech.steps[0].prompt
    assert [(piece.row, piece.length) for piece in talker_prompt.media] == [(5, 2), (7, 2), (9, 2)]
    assert [piece.layout for piece in talker_prompt.media] == [media_layout.layout_of(f) for f in pieces]
    assert talker_prompt.media[0].layout.num_opening_tokens == 2
    assert talker_prompt.media_positions == list(range(11, 17)) and talker_prompt.media_rows == list(range(5, 11))
    assert fake.schedules[0].speech.capture == {"a": list(range(11, 17))}
    fake.run()
    assert fake.audio_finish["a"] == "stop"


def test_a_request_whose_speech_ended_never_speaks_again_after_a_thinker_preemption():
    """The talker stops at its frame limit while the text goes on; thinker preemptions resume the text only."""
    scheduler = make_scheduler(lane(max_audio_frames=2), num_kv_blocks=9)
    for req_id in "ab":
        scheduler.add_request(speaking(req_id, max_tokens=20))
    fake = FakeLane(scheduler, {"a": list(range(10, 30)), "b": list(range(40, 60))}, {})
    fake.run()
    assert scheduler.num_preemptions > 0
    assert fake.audio == {"a": b"ab" * 2, "b": b"ab" * 2} and fake.audio_finish == {
        "a": "length",
        "b": "length",
    }
    assert fake.text_finish == {"a": "length", "b": "length"}


@pytest.mark.parametrize("frames_until_eos", [5, 1, 0])
def test_a_first_packet_of_two_frames_comes_one_step_later_with_both(frames_until_eos):
    """first_packet_frames 2: nothing at the first frame, both frames' PCM at the second, then a frame per step;
    speech that ends sooner sends what it has with its finish; the audio is the same bytes either way."""
    scheduler = make_scheduler(lane(first_packet_frames=2))
    scheduler.add_request(speaking("a"))
    fake = FakeLane(scheduler, {"a": [10, 11, 12]}, {"a": frames_until_eos})
    deltas = []
    while scheduler.has_unfinished_requests():
        before = fake.audio.get("a", b"")
        fake.step()
        deltas.append(fake.audio.get("a", b"")[len(before) :])
    assert fake.audio_finish["a"] == "stop" and fake.audio.get("a", b"") == b"ab" * frames_until_eos
    spoken = [delta for delta in deltas if delta]
    if frames_until_eos == 5:
        assert deltas[:3] == [b"", b"", b"abab"] and spoken == [b"abab", b"ab", b"ab", b"ab"]
    else:
        assert spoken == [b"ab"] * frames_until_eos  # flushed with the finish
