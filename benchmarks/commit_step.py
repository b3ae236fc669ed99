"""The commit step of a live session after N s of speech, in CPU time: what grows with the session's length.

Drives an EngineCore in this process (the embedded tiny model unless --model; fp32; one torch thread; no
prefix caching): opens a session, appends N s of speech-like audio window by window exactly as
StreamingSession does (StreamingAudioWindows + MRopeBuilder), stepping the engine until each window is
prefilled (no pacing), then appends the last chunk, flushes the last window, commits the turn and runs the
step that samples the first token. Reported: that step's thread CPU time, the part spent in attention, and
the rest; for each attention path in the same run: the `cpu` backend (the default: the C kernel, long chunks by
torch's flash kernel, both reading pages in place), the `reference` backend reading long contexts in place
(engine/model_executor/attention/cpu_flash.py) and, as the baseline, `reference` with every request on the gather
path (LONG_CONTEXT_BLOCKS raised past any context).

Also reported: the attention's arithmetic (q new tokens over their context in every layer: 4·heads·head_dim·
Σ keys per query, QKᵀ and PV) and its rate, next to this machine's rate on one plain matmul of the same shape
class measured in the same run ([kv_heads, group·q, head_dim] @ [kv_heads, head_dim, context], hot caches). The
attention cannot go much below GFLOP / reference rate: that is the CPU floor of what the commit step adds with the
session's length.

    python benchmarks/commit_step.py
    python benchmarks/commit_step.py --durations 10,600 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from streaming import SAMPLE_RATE, SYSTEM, speech  # noqa: E402

import omnistream.engine.model_executor.attention.torch_sdpa as torch_sdpa  # noqa: E402
from omnistream.engine.model_executor.attention.backend import AttentionBackend  # noqa: E402
from omnistream.engine.model_executor.attention.cpu_kernel import CpuBackend  # noqa: E402
from omnistream.engine.model_executor.attention.reference import ReferenceBackend  # noqa: E402
from omnistream.engine.core.engine_core import EngineCore  # noqa: E402
from omnistream.engine.engine_config import EngineConfig  # noqa: E402
from omnistream.multimodal.hashing import hash_media  # noqa: E402
from omnistream.multimodal.mrope import MRopeBuilder  # noqa: E402
from omnistream.multimodal.placeholders import MultimodalTokenIds  # noqa: E402
from omnistream.multimodal.streaming_mel import AudioWindow, StreamingAudioWindows  # noqa: E402
from omnistream.multimodal.tensor_codec import to_tensor_data  # noqa: E402
from omnistream.scheduler.mm_feature import MultiModalFeature  # noqa: E402
from omnistream.scheduler.sampling_params import SamplingParams  # noqa: E402
from omnistream.scheduler.tensor_data import PositionSegment  # noqa: E402

CHUNK = 1600  # 100 ms


PATHS = {  # attention path: (backend, LONG_CONTEXT_BLOCKS of the reference)
    "cpu": (CpuBackend(), torch_sdpa.LONG_CONTEXT_BLOCKS),
    "in_place": (ReferenceBackend(), torch_sdpa.LONG_CONTEXT_BLOCKS),
    "gather": (ReferenceBackend(), 1 << 30),
}


class AttentionClock:
    """Thread CPU time spent in the attention layer calls (KV write and attention) since the last reset."""

    def __init__(self) -> None:
        self.seconds = 0.0
        AttentionBackend.forward = self._timed(AttentionBackend.forward)

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start
        return timed


class LiveSession:
    """A session fed window by window straight into the engine core (what StreamingSession sends)."""

    def __init__(self, engine: EngineCore, session_id: str, window_frames: int) -> None:
        self.engine, self.session_id, self.window_frames = engine, session_id, window_frames
        self.ids = MultimodalTokenIds.from_config(engine.model_config)
        self.positions = MRopeBuilder(position_id_per_seconds=engine.model_config.position_id_per_seconds)
        tokens = engine.tokenizer.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        engine.open_session(session_id, tokens, [self._segment(len(tokens), self.positions.add_text(len(tokens)))])
        tokens = engine.tokenizer.encode("<|im_start|>user\n")
        self.append(tokens, self.positions.add_text(len(tokens)))
        self.append([self.ids.audio_start], self.positions.add_start())
        self.audio = StreamingAudioWindows(window_frames, SAMPLE_RATE)

    def _segment(self, count: int, positions: torch.Tensor) -> PositionSegment:
        return PositionSegment(start=self.positions.num_tokens - count, positions=to_tensor_data(positions))

    def append(self, tokens: list[int], positions: torch.Tensor, features: list | None = None) -> None:
        self.engine.append_input(self.session_id, tokens, features or [], [self._segment(len(tokens), positions)])

    def window(self, window: AudioWindow) -> None:
        positions = self.positions.add_audio(window.num_tokens)
        feature = MultiModalFeature(
            modality="audio", identifier=hash_media("audio-window", window.features, window_frames=self.window_frames),
            offset=self.positions.num_tokens - window.num_tokens, length=window.num_tokens,
            inputs={"input_features": to_tensor_data(window.features.contiguous())},
            options={"window_frames": self.window_frames, "part_of_longer_clip": window.stop_frame >= 100},
        )
        self.append([self.ids.audio_pad] * window.num_tokens, positions, [feature])

    def commit(self, last_chunk, params: SamplingParams) -> None:
        for window in self.audio.feed(last_chunk) + self.audio.flush():
            self.window(window)
        self.append([self.ids.audio_end], self.positions.add_end())
        tokens = self.engine.tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
        positions = self.positions.add_text(len(tokens))
        self.engine.commit_turn(self.session_id, tokens, params, [self._segment(len(tokens), positions)])


def drain(engine: EngineCore) -> None:
    while engine.has_work():
        engine.step()


def commit_step(engine: EngineCore, clock: AttentionClock, seconds: float, seed: int, session_id: str) -> dict:
    session = LiveSession(engine, session_id, 200)
    wave = speech(seconds, seed)
    last = (len(wave) - 1) // CHUNK * CHUNK
    for start in range(0, last, CHUNK):
        for window in session.audio.feed(wave[start : start + CHUNK]):
            session.window(window)
        drain(engine)
    session.commit(wave[last:], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    clock.seconds = 0.0
    before = engine.scheduler.requests[session_id].num_computed_tokens
    start = time.thread_time()
    outputs = engine.step()
    cpu = time.thread_time() - start
    if not any(o.req_id == session_id and o.new_token_ids for o in outputs):
        raise RuntimeError("the commit step did not sample the first token")
    context = engine.scheduler.requests[session_id].num_computed_tokens  # the keys: every prompt token, no output yet
    engine.abort_requests([session_id])
    drain(engine)
    return {"cpu_s": cpu, "attention_s": clock.seconds, "context_tokens": context,
            "new_tokens": context - before, "attention_gflop": attention_flop(engine, before, context - before) / 1e9}


def attention_flop(engine: EngineCore, past: int, new: int) -> float:
    """Multiply-adds ×2 of QKᵀ and PV for `new` queries after `past` cached tokens (query j sees past + j + 1 keys)."""
    text = engine.model_config.text
    keys = new * past + new * (new + 1) // 2
    return 4.0 * text.num_attention_heads * text.head_dim * text.num_hidden_layers * keys


def reference_gflops(engine: EngineCore, new: int, context: int, repeats: int = 30) -> float:
    """This machine's GFLOP/s on the attention's matmul shape: a kv head's grouped queries against its keys."""
    text = engine.model_config.text
    group = text.num_attention_heads // text.num_key_value_heads
    q = torch.randn(text.num_key_value_heads, group * new, text.head_dim)
    k = torch.randn(text.num_key_value_heads, text.head_dim, context)
    out = torch.empty(text.num_key_value_heads, group * new, context)
    torch.bmm(q, k, out=out)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.bmm(q, k, out=out)
    seconds = (time.perf_counter() - start) / repeats
    return 2.0 * q.numel() * context / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--durations", default="10,120,600", help="comma-separated seconds of speech")
    parser.add_argument("--repeats", type=int, default=3, help="sessions per duration and path (medians)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    durations = [float(x) for x in args.durations.split(",")]
    engine = EngineCore(EngineConfig(model=args.model, dtype="float32", enable_prefix_caching=False, device="cpu"))
    clock = AttentionClock()
    in_place_threshold = torch_sdpa.LONG_CONTEXT_BLOCKS
    commit_step(engine, clock, 2.0, 0, "warm-up")
    samples: dict[tuple[str, float], list[dict]] = {}
    for repeat in range(args.repeats):
        for seconds in durations:
            for path, (backend, threshold) in PATHS.items():
                torch_sdpa.LONG_CONTEXT_BLOCKS = threshold
                for layer in engine.model.model.layers:
                    layer.self_attn.backend = backend
                result = commit_step(engine, clock, seconds, int(seconds) + 1000 * repeat, f"{path}-{seconds:g}-{repeat}")
                samples.setdefault((path, seconds), []).append(result)
    torch_sdpa.LONG_CONTEXT_BLOCKS = in_place_threshold
    rows = []
    for (path, seconds), results in samples.items():
        cpu = statistics.median(r["cpu_s"] for r in results)
        attention = statistics.median(r["attention_s"] for r in results)
        rest = statistics.median(r["cpu_s"] - r["attention_s"] for r in results)
        gflop = results[0]["attention_gflop"]
        rows.append({"path": path, "audio_s": seconds, "context_tokens": results[0]["context_tokens"],
                     "step_cpu_ms": cpu * 1e3, "attention_cpu_ms": attention * 1e3, "rest_cpu_ms": rest * 1e3,
                     "attention_gflop": gflop, "attention_gflops": gflop / attention if attention else None})
    longest = samples[("cpu", max(durations))][0]
    reference = reference_gflops(engine, longest["new_tokens"], longest["context_tokens"])
    print(f"Commit step of a live session (first token), thread CPU time, medians of {args.repeats}")
    print(f"{'path':>9} {'audio s':>8} {'context':>8} {'step ms':>8} {'attention ms':>13} {'rest ms':>8} "
          f"{'vs shortest':>12} {'attn GFLOP':>11} {'attn GFLOP/s':>13}")
    for path in PATHS:
        mine = [r for r in rows if r["path"] == path]
        shortest = min(mine, key=lambda r: r["audio_s"])
        for r in sorted(mine, key=lambda r: r["audio_s"]):
            r["vs_shortest"] = r["step_cpu_ms"] / shortest["step_cpu_ms"]
            print(f"{path:>9} {r['audio_s']:>8g} {r['context_tokens']:>8} {r['step_cpu_ms']:>8.1f} "
                  f"{r['attention_cpu_ms']:>13.1f} {r['rest_cpu_ms']:>8.1f} {r['vs_shortest']:>11.2f}x "
                  f"{r['attention_gflop']:>11.3f} {r['attention_gflops'] or 0:>13.1f}")
    floor_ms = longest["attention_gflop"] / reference * 1e3
    print(f"reference: one bmm of the attention's shape ({longest['new_tokens']} queries over "
          f"{longest['context_tokens']} keys) runs at {reference:.1f} GFLOP/s here, so the {max(durations):g} s "
          f"commit's attention needs at least ~{floor_ms:.1f} ms of CPU at that rate")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"config": vars(args), "rows": rows, "reference_gflops": reference,
                       "attention_floor_ms": floor_ms}, f, indent=2)
    engine.shutdown()


if __name__ == "__main__":
    main()
