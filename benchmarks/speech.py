"""Time spoken answers on the engine core in this process (embedded tiny model by default, or a checkpoint).

For each concurrency C in `--voices`, C chat requests that ask for audio (different questions, voices round
robin, seeded sampling) are added at once and stepped to the end; every engine output is time-stamped.
Reported per C (medians over the voices, and the worst voice):
- `first audio after first text`: engine steps and ms from the step that returned a request's first text token
  to the one that returned its first audio (the design: one step);
- `request -> first audio`: ms from adding the requests to a voice's first PCM delta (1365 samples);
- `RTF`: wall time from a voice's first to its last audio over the duration of audio it got after the
  first packet (below 1: faster than real time);
- `step CPU`: the process's CPU time per engine step that returned audio (median, and the slowest), the
  lane's cost free of waiting on a loaded box;
- `underruns`: a client that starts playing at the first packet (a one-packet prebuffer) and plays at 1x
  underruns whenever a packet arrives after everything before it has played; voices with none are counted.
Then `end of speech -> first audio` (the Realtime target): a live session (AsyncLLM, the engine in its own
process, as the servers run it) gets a `--utterance-s` utterance in 100 ms chunks at 1x, each sent once it has
been "spoken", and commits a spoken turn; the time from the end of the utterance to the answer's first audio,
over `--session-runs` turns (the WebSocket's own cost is not included).
Also the engine's start-up time with and without the speech lane (`--enable-speech` off), to check that users who
never ask for audio do not wait for it. Example (the numbers in the README, a loaded 2-core box):
    python benchmarks/speech.py --threads 1 --voices 1 4 8 --frames 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from omnistream.engine.core.engine_core import EngineCore
from omnistream.engine.core.request import EngineCoreRequest
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.scheduler.sampling_params import SamplingParams, SpeechParams

SAMPLE_RATE = 24000
QUESTIONS = ["Tell me a story about a fox.", "What is the weather like?", "Explain gravity.", "Sing a song."]
VOICES = ["ethan", "chelsie", "aiden"]


@dataclass
class Voice:
    """One request's timeline: when its text and audio came, and how much audio."""

    added: float
    first_text: tuple[int, float] | None = None  # (engine step, time)
    first_audio: tuple[int, float] | None = None
    packets: list[tuple[float, int]] = field(default_factory=list)  # (arrival, samples)

    def underruns(self) -> int:
        """Packets that arrived after the audio before them had played (playback starts at packet 0)."""
        if not self.packets:
            return 0
        start, queued, count = self.packets[0][0], 0.0, 0
        for arrival, samples in self.packets:
            if arrival > start + queued + 1e-9:
                count += 1
                start, queued = arrival, 0.0  # playback stalls, then resumes with this packet
            queued += samples / SAMPLE_RATE
        return count

    def rtf(self) -> float | None:
        if len(self.packets) < 2:
            return None
        spoken = sum(samples for _, samples in self.packets[1:]) / SAMPLE_RATE
        return (self.packets[-1][0] - self.packets[0][0]) / spoken


def startup_s(model: str | None, enable_speech: bool) -> float:
    began = time.perf_counter()
    engine = EngineCore(EngineConfig(model=model, enable_speech=enable_speech))
    elapsed = time.perf_counter() - began
    engine.shutdown()
    return elapsed


@dataclass
class Run:
    """The voices' timelines and the CPU seconds of every engine step that returned audio."""

    voices: dict[str, Voice]
    step_cpu: list[float]


def run(engine: EngineCore, voices: int, max_tokens: int) -> Run:
    tokenizer = engine.tokenizer
    timelines: dict[str, Voice] = {}
    now = time.perf_counter()
    for i in range(voices):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True
        )
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0.8, seed=i, speech=SpeechParams(voice=VOICES[i % len(VOICES)])
        )
        request_id = f"voice-{i}"
        engine.add_request(
            EngineCoreRequest(
                request_id=request_id,
                prompt_token_ids=tokenizer.encode(text),
                sampling_params=params,
                arrival_time=time.monotonic(),
            )
        )
        timelines[request_id] = Voice(added=now)
    step, step_cpu = 0, []
    while engine.has_unfinished_requests():
        cpu = time.process_time()
        outputs = engine.step()
        stamp = time.perf_counter()
        if any(output.new_audio for output in outputs):
            step_cpu.append(time.process_time() - cpu)
        for output in outputs:
            voice = timelines[output.req_id]
            if output.new_token_ids and voice.first_text is None:
                voice.first_text = (step, stamp)
            if output.new_audio:
                voice.first_audio = voice.first_audio or (step, stamp)
                voice.packets.append((stamp, len(output.new_audio) // 2))
        step += 1
    return Run(timelines, step_cpu)


def report(voices: int, result: Run) -> str:
    items = list(result.voices.values())
    gap_steps = [v.first_audio[0] - v.first_text[0] for v in items]
    gap_ms = [1e3 * (v.first_audio[1] - v.first_text[1]) for v in items]
    first_ms = [1e3 * (v.first_audio[1] - v.added) for v in items]
    rtfs = [r for r in (v.rtf() for v in items) if r is not None]
    smooth = sum(v.underruns() == 0 for v in items)
    seconds = sum(sum(s for _, s in v.packets) for v in items) / SAMPLE_RATE
    return (
        f"| {voices} | {statistics.median(gap_steps):.0f} (max {max(gap_steps)}) | "
        f"{statistics.median(gap_ms):.1f} (max {max(gap_ms):.1f}) | {statistics.median(first_ms):.0f} "
        f"(max {max(first_ms):.0f}) | {statistics.median(rtfs):.2f} (max {max(rtfs):.2f}) | "
        f"{1e3 * statistics.median(result.step_cpu):.1f} (max {1e3 * max(result.step_cpu):.1f}) | {smooth}/{voices} | {seconds:.1f} |"
    )


async def end_of_speech_to_first_audio(llm: AsyncLLM, seconds: float, max_tokens: int, seed: int) -> float:
    """ms from the end of a `seconds` utterance streamed at 1x (16 kHz, 100 ms chunks) to the first audio."""
    rate, chunk = 16000, 1600
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.2 * np.sin(2 * np.pi * (180 + 40 * np.sin(2 * np.pi * 0.7 * t)) * t)).astype(np.float32)
    session = await llm.open_session(None, SamplingParams(max_tokens=max_tokens), 2.0)
    try:
        start = time.perf_counter()
        for i in range(0, len(wave), chunk):
            end = min(i + chunk, len(wave))
            await asyncio.sleep(max(0.0, start + end / rate - time.perf_counter()))  # this chunk has been spoken
            await session.append_audio(wave[i:end], rate)
        spoken = start + len(wave) / rate
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed, speech=SpeechParams())
        async with contextlib.aclosing(await session.commit(params)) as answer:
            async for output in answer:
                if output.outputs[0].audio:
                    return 1e3 * (time.perf_counter() - spoken)
        raise RuntimeError("the answer ended without audio")
    finally:
        await session.close()


def session_report(model: str | None, frames: int, runs: int, seconds: float, max_tokens: int) -> str:
    llm = AsyncLLM(model=model, max_audio_frames=frames)
    try:
        asyncio.run(end_of_speech_to_first_audio(llm, 1.0, 2, seed=0))  # warm-up
        times = [asyncio.run(end_of_speech_to_first_audio(llm, seconds, max_tokens, seed)) for seed in range(runs)]
    finally:
        llm.shutdown()
    return (
        f"end of speech -> first audio ({seconds:g} s utterance at 1x, {runs} turns): "
        f"p50 {statistics.median(times):.0f} ms, max {max(times):.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--voices", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--frames", type=int, default=50, help="max audio frames (80 ms) per answer")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--session-runs", type=int, default=5, help="live-session turns timed (0: none)")
    parser.add_argument("--utterance-s", type=float, default=5.0, help="seconds of speech before each turn")
    parser.add_argument(
        "--first-packet-frames", type=int, default=1, help="frames in a voice's first audio packet (engine option)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with_speech, without = startup_s(args.model, True), startup_s(args.model, False)
    print(f"engine start-up: {with_speech:.2f} s with the speech lane, {without:.2f} s without")
    print(
        "| voices | first audio after first text (steps) | same (ms) | request -> first audio (ms) | RTF | "
        "step CPU (ms) | voices with no underrun | audio (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for voices in args.voices:
        first_packet = {} if args.first_packet_frames == 1 else {"speech_first_packet_frames": args.first_packet_frames}
        config = EngineConfig(
            model=args.model, max_audio_frames=args.frames, max_num_voices=max(args.voices), **first_packet
        )
        engine = EngineCore(config)
        try:
            run(engine, 1, 2)  # warm-up
            print(report(voices, run(engine, voices, args.max_tokens)))
        finally:
            engine.shutdown()
    if args.session_runs:
        print(session_report(args.model, args.frames, args.session_runs, args.utterance_s, args.max_tokens))


if __name__ == "__main__":
    main()
