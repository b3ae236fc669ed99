"""The flags, validators and serving defaults that the CLI's subcommands and `omnistream serve` share (engine
flags, media limits, the fan-out of one call).

Imported by cli.py (which builds the parser) and serve.py (which turns parsed flags into the engine's arguments),
so neither imports the other's module to get them.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from omnistream.engine.engine_config import ATTENTION_BACKENDS

_MODALITIES = ("audio", "image", "video")
DEFAULT_MAX_FANOUT = 256  # engine requests one HTTP or gRPC call may make (prompts × n): one full batch
DEFAULT_MAX_QUEUED_REQUESTS = 1024  # `serve`: requests waiting for their first token before new ones get 429


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks, one per device")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch CPU threads of the engine (default: all cores; serve: all but one, kept for "
                             "the front end)")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                        help="attention kernels (default auto: triton on CUDA when triton imports, cpu on CPU when a "
                             "C compiler builds it, else reference)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step eager: no CUDA graphs for decode steps (they are off on CPU anyway)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="schedule the next step while the current one runs (default: on for CUDA, off on CPU)")
    parser.add_argument("--enable-speech", action=argparse.BooleanOptionalAction, default=True,
                        help="load the checkpoint's talker and code2wav to answer in speech (TP=1 only)")
    parser.add_argument("--max-num-voices", type=positive, default=8, help="requests speaking at once")
    parser.add_argument("--num-talker-kv-blocks", type=positive, default=None,
                        help="talker KV blocks (default: max-num-voices answers of max-audio-frames)")
    parser.add_argument("--max-audio-frames", type=positive, default=4096, help="80 ms frames per spoken answer")
    parser.add_argument("--speech-first-packet-frames", type=positive, default=1,
                        help="frames in a voice's first audio packet (2: one step later, 137 ms instead of 57 ms)")
    parser.add_argument("--log-level", default="warning")


def mm_limits(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt '{"image": 2, "audio": 1}'."""
    try:
        limits = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(limits, dict) or not all(
        k in _MODALITIES and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in limits.items()
    ):
        raise argparse.ArgumentTypeError(f"expected an object of {'/'.join(_MODALITIES)} to counts >= 0, got {text}")
    return limits


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def check_fanout(count: int, limit: int) -> None:
    """ValueError naming the flag when one call would make more than `limit` engine requests."""
    if count > limit:
        raise ValueError(f"this request makes {count} engine requests (prompts × n), more than the limit of "
                         f"{limit} (--max-fanout-per-request)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields from the engine flags every subcommand shares (`add_engine_args`)."""
    names = ("dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
             "enable_prefix_caching", "num_kv_blocks", "seed", "tensor_parallel_size", "cpu_threads", "attention_backend",
             "enforce_eager", "async_scheduling", "enable_speech", "max_num_voices", "num_talker_kv_blocks",
             "max_audio_frames", "speech_first_packet_frames")
    return {name: getattr(args, name) for name in names}
