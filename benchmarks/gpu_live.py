"""Live audio on the benchmark model: end of speech → first token at a short and a long session length.

Owns only the choice of benchmarks/streaming.py's latency mode settings; the measurement is streaming.py's own
(`run_latency`). Fast mode (--fill-speed 0): all audio but the last chunk is appended as fast as the engine takes
it and prefilled, then the last chunk is handed over and the time to the first answer token is measured; the
session then holds what a session paced in real time holds at its end of speech, so 600 s of speech costs far
less than 10 minutes of wall time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import streaming


def live_latency(
    model_dir: Path, device: str, dtype: str, durations: list[float], cpu_threads: int | None
) -> dict[str, Any]:
    """streaming.py latency rows for `durations` (seconds of speech), plus the long/short ratio."""
    argv = [
        "latency",
        "--model",
        str(model_dir),
        "--device",
        device,
        "--dtype",
        dtype,
        "--durations",
        ",".join(f"{d:g}" for d in durations),
        "--fill-speed",
        "0",
        "--max-tokens",
        "4",
    ]
    if cpu_threads:
        argv += ["--cpu-threads", str(cpu_threads)]
    result = asyncio.run(streaming.run_latency(streaming.parse_args(argv)))
    by_length = {row["audio_s"]: row for row in result["rows"]}
    short, long = by_length[min(by_length)], by_length[max(by_length)]
    return {
        "rows": [
            {key: row[key] for key in ("audio_s", "streaming_eos_to_first_s", "offline_first_s", "ratio")}
            for row in result["rows"]
        ],
        "short_s": short["audio_s"],
        "long_s": long["audio_s"],
        "short_eos_to_first_ms": short["streaming_eos_to_first_s"] * 1e3,
        "long_eos_to_first_ms": long["streaming_eos_to_first_s"] * 1e3,
        "long_over_short": long["streaming_eos_to_first_s"] / short["streaming_eos_to_first_s"],
    }
