"""Streaming-audio benchmark: speech paced in real time into live sessions (omnistream's point: the
audio is encoded and prefilled while the user speaks, so the answer starts right after they stop).

Two modes, both on one AsyncLLM (the embedded tiny default model unless --model; fp32; greedy):

latency      For each duration (default 10, 30, 120, 600 s), a synthetic speech-like clip (chirps +
             noise) is appended in --chunk-ms chunks (default 100 ms) paced at --speed x real time
             into a session (audio window --window-s, default 2 s), then the turn is committed.
             streaming  = end of speech -> first answer token. End of speech is the moment the last
                          chunk is due (its audio exists) and is handed to append_audio(); commit()
                          follows at once, so the figure includes the last append, the flush of the
                          last partial window, its encoding and prefill, and the first decode.
             offline    = the same engine given a whole clip of the same length at the end via
                          AsyncLLM.generate (same chat prompt + multi_modal_data, same window), from
                          the call to the first token (mel, encoder, prefill of every token, decode).
             The offline clip uses another seed than the streamed one so that neither can reuse the
             other's encoder outputs; prefix caching is off unless --prefix-caching.
concurrency  For each N in --streams (default 1,2,4,8), N live sessions run concurrently, each with
             its own clip paced at 1x for --stream-s seconds. A --decoding-fraction of them also
             commit a turn every --turn-s seconds of speech and decode a --answer-tokens answer (the
             user then resumes speaking); every session commits at its end. Reported per N:
               ingest lag  (own timing, one sample per chunk): how late append_audio() returned
                           relative to the moment the chunk's audio existed. It grows without
                           bound when the engine cannot keep up (appends are applied between steps).
               sched lag   (the scheduler's stream_lags via Scheduler.lag_percentiles(), one sample
                           each time pending live input is scheduled): how long appended input
                           waited in the scheduler before it was given budget.
               eos->first  end of speech -> first token of every committed turn.
             "real-time" = p99 of both lags under --max-lag-ms (default 500); the largest N for which
             it and every smaller N in the sweep hold is reported.

A 600 s duration at 1x takes 10 minutes of wall time (plus its offline run): --quick runs 10, 30 and
120 s at 1x. --speed > 1 shortens runs but the headline figures are the 1x ones. --fill-speed S (fast
mode) appends all but the last chunk at S x real time (0: as fast as the engine takes them), waits until
the engine has prefilled it all, then hands over the last chunk and measures the same end of speech ->
first token (the session then holds what a 1x run holds at end of speech); --repeats N reports medians.

Examples:
    python benchmarks/streaming.py latency --quick
    python benchmarks/streaming.py latency --durations 10,600 --output-json lat.json
    python benchmarks/streaming.py concurrency --streams 1,2,4 --stream-s 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
SYSTEM = "You are a helpful assistant."
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"


def speech(seconds: float, seed: int) -> np.ndarray:
    """Speech-like float32 audio at 16 kHz: a chirp per ~0.7 s "syllable" over pink-ish noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    syllable = 0.7
    phase_t = np.mod(t, syllable)
    index = (t // syllable).astype(np.int64)
    n_syllables = int(index.max(initial=0)) + 1
    base = rng.uniform(120, 260, size=n_syllables)[index]
    sweep = rng.uniform(-150, 250, size=n_syllables)[index]
    freq_phase = 2 * np.pi * (base * phase_t + 0.5 * sweep * phase_t**2 / syllable)
    envelope = np.sin(np.pi * np.clip(phase_t / (0.8 * syllable), 0, 1)) ** 2
    wave = 0.25 * envelope * (np.sin(freq_phase) + 0.4 * np.sin(2 * freq_phase) + 0.2 * np.sin(3 * freq_phase))
    noise = rng.standard_normal(n)
    wave += 0.02 * np.cumsum(noise) / np.sqrt(np.arange(1, n + 1)) + 0.01 * noise
    return np.clip(wave, -1, 1).astype(np.float32)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def make_llm(args: argparse.Namespace):
    from omnistream.engine.frontend.async_llm import AsyncLLM

    kwargs: dict[str, Any] = dict(
        dtype=args.dtype, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.prefix_caching,
    )
    if args.device:
        kwargs["device"] = args.device
    if args.num_kv_blocks:
        kwargs["num_kv_blocks"] = args.num_kv_blocks
    if args.max_model_len:
        kwargs["max_model_len"] = args.max_model_len
    if args.cpu_threads:
        kwargs["cpu_threads"] = args.cpu_threads
    return AsyncLLM(args.model, **kwargs)


def greedy(max_tokens: int):
    from omnistream.scheduler.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


# ---- one streamed turn / one offline request ---------------------------------------------------------


async def stream_audio(session, wave: np.ndarray, chunk: int, speed: float, lags: list[float] | None) -> float:
    """Append `wave` in chunks paced at `speed` x real time; returns the end-of-speech instant (when the
    last chunk was due and handed over). Each chunk is due when its last sample exists."""
    start = time.monotonic()
    n_chunks = -(-len(wave) // chunk)
    eos = start
    for i in range(n_chunks):
        piece = wave[i * chunk : (i + 1) * chunk]
        due = start + (i * chunk + len(piece)) / SAMPLE_RATE / speed
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if i == n_chunks - 1:
            eos = time.monotonic()
        await session.append_audio(piece, SAMPLE_RATE)
        if lags is not None:
            lags.append(max(0.0, time.monotonic() - due))
    return eos


async def first_token_after(stream, since: float) -> tuple[float | None, int]:
    """Drain a stream of cumulative RequestOutputs; (seconds from `since` to the first token, tokens)."""
    first = None
    n = 0
    async for output in stream:
        n = len(output.outputs[0].token_ids)
        if first is None and n:
            first = time.monotonic() - since
    return first, n


async def prefill_then_last_chunk(llm, session, wave: np.ndarray, chunk: int, fill_speed: float) -> float:
    """Fast mode: append all but the last chunk at fill_speed x real time (0: as fast as appends return),
    wait until the engine has prefilled every token appended so far, then hand over the last chunk one
    chunk period later. Returns the end-of-speech instant (when the last chunk was handed over)."""
    base = (await llm.get_stats()).scheduler.num_live_prefill_tokens - session.positions.num_tokens
    last = (len(wave) - 1) // chunk * chunk
    await stream_audio(session, wave[:last], chunk, fill_speed or float("inf"), None)
    while (await llm.get_stats()).scheduler.num_live_prefill_tokens - base < session.positions.num_tokens:
        await asyncio.sleep(0.01)
    await asyncio.sleep(chunk / SAMPLE_RATE)
    eos = time.monotonic()
    await session.append_audio(wave[last:], SAMPLE_RATE)
    return eos


async def streamed_turn(llm, wave, args, params) -> dict:
    session = await llm.open_session(system_prompt=SYSTEM, sampling_params=params, audio_window_s=args.window_s)
    try:
        lags: list[float] = []
        chunk = int(args.chunk_ms * SAMPLE_RATE / 1000)
        if getattr(args, "fill_speed", None) is None:
            eos = await stream_audio(session, wave, chunk, args.speed, lags)
        else:
            eos = await prefill_then_last_chunk(llm, session, wave, chunk, args.fill_speed)
        t_commit = time.monotonic()
        stream = await session.commit(params)
        t_committed = time.monotonic()
        first, n = await first_token_after(stream, eos)
        return {"eos_to_first_s": first, "commit_call_s": t_committed - t_commit,
                "append_lag_p99_s": pct(lags, 99), "tokens": n}
    finally:
        await session.close()


async def offline_request(llm, wave, args, params) -> dict:
    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{AUDIO}<|im_end|>\n<|im_start|>assistant\n"
    request = {"prompt": prompt, "multi_modal_data": {"audio": [(wave, SAMPLE_RATE)]},
               "mm_processor_kwargs": {"audio_window_s": args.window_s}}
    start = time.monotonic()
    first, n = await first_token_after(llm.generate(request, params), start)
    return {"first_token_s": first, "tokens": n}


# ---- latency mode ------------------------------------------------------------------------------------


async def run_latency(args: argparse.Namespace) -> dict:
    llm = make_llm(args)
    params = greedy(args.max_tokens)
    try:
        # warm-up: one short streamed turn and one short offline request
        await streamed_turn(llm, speech(2.0, 999), argparse.Namespace(**{**vars(args), "speed": 50.0}), params)
        await offline_request(llm, speech(2.0, 998), args, params)
        samples: dict[float, list[tuple[dict, dict]]] = {seconds: [] for seconds in args.durations}
        started = time.monotonic()
        for repeat in range(args.repeats):  # repeats interleave the durations, so noise hits them alike
            for seconds in args.durations:
                seed = int(seconds) * 2 + 1 + 10_000 * repeat  # fresh audio: no encoder-cache reuse
                streamed = await streamed_turn(llm, speech(seconds, seed), args, params)
                offline = await offline_request(llm, speech(seconds, seed + 1), args, params)
                samples[seconds].append((streamed, offline))
                print(f"  {seconds:g} s done: streaming {ms(streamed['eos_to_first_s'])} ms, "
                      f"offline {ms(offline['first_token_s'])} ms", file=sys.stderr, flush=True)
        rows = []
        for seconds, pairs in samples.items():
            streaming = [p[0]["eos_to_first_s"] for p in pairs]
            offline_s = [p[1]["first_token_s"] for p in pairs]
            s, o = statistics.median(streaming), statistics.median(offline_s)
            rows.append({"audio_s": seconds, "speed": args.speed, "fill_speed": args.fill_speed,
                         "streaming_eos_to_first_s": s, "offline_first_s": o, "ratio": s / o,
                         "streaming_samples_s": streaming, "offline_samples_s": offline_s,
                         "commit_call_s": statistics.median(p[0]["commit_call_s"] for p in pairs),
                         "append_lag_p99_s": max((p[0]["append_lag_p99_s"] or 0.0) for p in pairs)})
        print(f"  all done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        return {"mode": "latency", "config": _config(args), "rows": rows, "checks": _latency_checks(rows)}
    finally:
        llm.shutdown()


def _latency_checks(rows: list[dict]) -> dict:
    by_len = {r["audio_s"]: r for r in rows}
    checks: dict[str, Any] = {}
    shortest, longest = min(by_len), max(by_len)
    if longest > shortest:
        checks[f"flatness_{longest:g}s_over_{shortest:g}s"] = (
            by_len[longest]["streaming_eos_to_first_s"] / by_len[shortest]["streaming_eos_to_first_s"]
        )
    if 120 in by_len:
        checks["ratio_at_120s"] = by_len[120]["ratio"]
    return checks


def print_latency(result: dict) -> None:
    cfg = result["config"]
    pacing = (f"paced at {cfg['speed']:g}x real time" if cfg["fill_speed"] is None else
              f"fast mode: all but the last chunk prefilled at {cfg['fill_speed'] or 'full'} speed")
    print(f"\nEnd of speech -> first token (audio {pacing}, {cfg['chunk_ms']:g} ms chunks, window "
          f"{cfg['window_s']:g} s; medians of {cfg['repeats']})")
    print(f"{'audio s':>8} {'streaming ms':>13} {'offline ms':>11} {'ratio':>7} {'append p99 ms':>14}")
    for r in result["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"{r['audio_s']:>8g} {ms(r['streaming_eos_to_first_s']):>13} {ms(r['offline_first_s']):>11} "
              f"{ratio:>7} {ms(r['append_lag_p99_s']):>14}")
    for name, value in result["checks"].items():
        print(f"{name}: {value:.3f}")


# ---- concurrency mode --------------------------------------------------------------------------------


async def live_stream(llm, index: int, decoding: bool, args, ingest: list[float], eos_first: list[float]) -> None:
    params = greedy(args.answer_tokens)
    session = await llm.open_session(system_prompt=SYSTEM, sampling_params=params, audio_window_s=args.window_s)
    chunk = int(args.chunk_ms * SAMPLE_RATE / 1000)
    wave = speech(args.stream_s, 10_000 + index)
    turn = int(args.turn_s * SAMPLE_RATE) if decoding else len(wave)
    try:
        for start in range(0, len(wave), turn):
            eos = await stream_audio(session, wave[start : start + turn], chunk, 1.0, ingest)
            first, _ = await first_token_after(await session.commit(params), eos)
            if first is not None:
                eos_first.append(first)
    finally:
        await session.close()


async def run_concurrency(args: argparse.Namespace) -> dict:
    llm = make_llm(args)
    try:
        await streamed_turn(llm, speech(2.0, 999), argparse.Namespace(**{**vars(args), "speed": 50.0}),
                            greedy(args.answer_tokens))
        rows = []
        for n in args.streams:
            await llm.get_stats(reset_lag_samples=True)
            ingest: list[float] = []
            eos_first: list[float] = []
            n_decoding = round(n * args.decoding_fraction)
            started = time.monotonic()
            await asyncio.gather(*(live_stream(llm, i, i < n_decoding, args, ingest, eos_first) for i in range(n)))
            sched = await llm.get_stats()
            row = {
                "streams": n, "decoding_streams": n_decoding,
                "ingest_lag_p50_s": pct(ingest, 50), "ingest_lag_p99_s": pct(ingest, 99),
                "sched_lag_p50_s": sched.lag_p50, "sched_lag_p99_s": sched.lag_p99, "sched_lag_samples": sched.lag_count,
                "eos_to_first_p50_s": pct(eos_first, 50), "eos_to_first_p99_s": pct(eos_first, 99),
                "turns": len(eos_first), "wall_s": time.monotonic() - started,
            }
            worst = max(v for v in (row["ingest_lag_p99_s"], row["sched_lag_p99_s"]) if v is not None)
            row["real_time"] = worst * 1e3 <= args.max_lag_ms
            rows.append(row)
            print(f"  {n} streams done", file=sys.stderr, flush=True)
        largest = 0
        for row in rows:  # the sweep in ascending order: stop at the first N that falls behind
            if not row["real_time"]:
                break
            largest = row["streams"]
        return {"mode": "concurrency", "config": _config(args), "rows": rows, "largest_real_time_streams": largest}
    finally:
        llm.shutdown()


def print_concurrency(result: dict) -> None:
    cfg = result["config"]
    print(f"\nConcurrent live streams ({cfg['stream_s']:g} s of speech each at 1x, {cfg['chunk_ms']:g} ms chunks, "
          f"window {cfg['window_s']:g} s; {cfg['decoding_fraction']:g} of them commit every {cfg['turn_s']:g} s "
          f"and decode {cfg['answer_tokens']} tokens)")
    print(f"{'streams':>7} {'decoding':>8} {'ingest p50/p99 ms':>18} {'sched p50/p99 ms':>17} "
          f"{'eos->first p50/p99 ms':>22} {'turns':>6} {'real-time':>9}")
    for r in result["rows"]:
        print(f"{r['streams']:>7} {r['decoding_streams']:>8} "
              f"{ms(r['ingest_lag_p50_s']) + '/' + ms(r['ingest_lag_p99_s']):>18} "
              f"{ms(r['sched_lag_p50_s']) + '/' + ms(r['sched_lag_p99_s']):>17} "
              f"{ms(r['eos_to_first_p50_s']) + '/' + ms(r['eos_to_first_p99_s']):>22} "
              f"{r['turns']:>6} {'yes' if r['real_time'] else 'NO':>9}")
    print(f"largest stream count with p99 lag <= {cfg['max_lag_ms']:g} ms: {result['largest_real_time_streams']}")


# ---- command line ------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    common.add_argument("--dtype", default="float32", help="engine dtype (default float32)")
    common.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    common.add_argument("--window-s", type=float, default=2.0, help="session audio window in seconds (1-8; default 2)")
    common.add_argument("--chunk-ms", type=float, default=100.0, help="audio chunk size in ms (default 100)")
    common.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine token budget per step")
    common.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks (default: the engine's)")
    common.add_argument("--max-model-len", type=int, default=None, help="engine max_model_len (default: the engine's)")
    common.add_argument("--cpu-threads", type=int, default=None,
                        help="torch threads of the engine core (default: the engine's, all cores but one)")
    common.add_argument("--prefix-caching", action="store_true", help="enable prefix caching (default off)")
    common.add_argument("--output-json", default=None, help="also write the results to this JSON file")
    sub = parser.add_subparsers(dest="mode", required=True)

    lat = sub.add_parser("latency", parents=[common], help="end of speech -> first token vs audio length")
    lat.add_argument("--durations", type=_floats, default=[10, 30, 120, 600],
                     help="comma-separated audio lengths in seconds (default 10,30,120,600; 600 s at 1x = 10 min)")
    lat.add_argument("--quick", action="store_true", help="preset: durations 10,30,120 at 1x real time")
    lat.add_argument("--speed", type=float, default=1.0, help="pacing, x real time (default 1; headline figures: 1)")
    lat.add_argument("--fill-speed", type=float, default=None,
                     help="fast mode: append all but the last chunk at this x real time (0: as fast as the engine "
                          "takes them), wait until it is prefilled, then time the last chunk -> first token")
    lat.add_argument("--max-tokens", type=int, default=8, help="answer length (greedy; default 8)")
    lat.add_argument("--repeats", type=int, default=1, help="runs per duration, reported as medians (default 1)")

    con = sub.add_parser("concurrency", parents=[common], help="sweep of concurrent live streams")
    con.add_argument("--streams", type=_ints, default=[1, 2, 4, 8], help="comma-separated stream counts (default 1,2,4,8)")
    con.add_argument("--stream-s", type=float, default=30.0, help="seconds of speech per stream (default 30)")
    con.add_argument("--decoding-fraction", type=float, default=0.5,
                     help="fraction of streams that commit turns periodically and decode answers (default 0.5)")
    con.add_argument("--turn-s", type=float, default=10.0, help="speech per turn of a decoding stream (default 10)")
    con.add_argument("--answer-tokens", type=int, default=16, help="answer length of each turn (default 16)")
    con.add_argument("--max-lag-ms", type=float, default=500.0, help="real-time threshold on p99 lag (default 500)")

    args = parser.parse_args(argv)
    if args.mode == "latency" and args.quick:
        args.durations, args.speed = [10, 30, 120], 1.0
    if args.mode == "concurrency":
        args.streams = sorted(args.streams)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode == "latency":
        result = asyncio.run(run_latency(args))
        print_latency(result)
    else:
        result = asyncio.run(run_concurrency(args))
        print_concurrency(result)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
