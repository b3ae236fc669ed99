"""Time omnistream's log-mel against HF `WhisperFeatureExtractor(feature_size=128)` on a synthetic 10-minute clip.

All variants run interleaved (so background load hits them alike) and the table gives median wall and CPU
(process) time, each one's ratio to the HF baseline, the best wall time, and the largest absolute difference from
HF. Rows:
- `hf`: the extractor as a user calls it on a long clip (`return_tensors="pt", padding="longest",
  truncation=False`; the defaults pad/truncate to 30 s). With torch installed it always takes its torch path
  (`torch.stft`), on `device="cpu"` unless told otherwise; `return_tensors` only converts the result.
- `hf-qwen`: as Qwen3-Omni's processor calls it (`padding=True, truncation=False, return_attention_mask=True`).
- `hf-fbank`: HF's feature computation alone (`_torch_extract_fbank_features`), without its padding and
  conversions: the least HF can take.
- `ours`: `log_mel_spectrogram` with the kernel it picks (see `multimodal/mel_kernel.py`; the table's header says
  which); `ours-c`: the compiled passes around `torch.fft.rfft` (what `OMNISTREAM_MEL_KERNEL=c` gives);
  `ours-torch`: the pure-torch fallback (`OMNISTREAM_MEL_KERNEL=torch`); `ours@REV`: the function at git revision
  REV (`--compare-ref REV`).
`--chunk-sweep 256,1024,...` also times `ours` with those frames per chunk (`ours/N` rows). `--profile` prints where
the time goes: self CPU time per ATen op per call, for `hf-fbank` and `ours-torch` (torch.profiler; its per-op
overhead inflates the many small ops of the chunked path a little; it does not see inside the compiled kernel).
Example:
    python benchmarks/mel.py --minutes 10 --repeats 15 --threads 1 --compare-ref HEAD~1 --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import WhisperFeatureExtractor

from omnistream.multimodal import mel, mel_kernel
from omnistream.multimodal.mel import log_mel_spectrogram
from omnistream.multimodal.mel_filters import SAMPLE_RATE

REPO = Path(__file__).resolve().parents[1]


def synthetic_clip(minutes: float, seed: int = 0) -> np.ndarray:
    """A gliding tone plus noise with a slow loudness envelope, float32 at 16 kHz."""
    t = np.arange(int(minutes * 60 * SAMPLE_RATE)) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * (200 + 50 * t % 3000) * t) * (0.5 + 0.4 * np.sin(2 * np.pi * t / 7))
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.02
    return (0.3 * tone + noise).astype(np.float32)


def mel_module_at(rev: str) -> types.ModuleType:
    """multimodal/mel.py as it was at git revision `rev`, loaded beside the current one."""
    source = subprocess.run(["git", "show", f"{rev}:multimodal/mel.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"omnistream.multimodal.mel_at_{rev}")
    module.__package__ = "omnistream.multimodal"
    exec(compile(source, f"{rev}:multimodal/mel.py", "exec"), module.__dict__)
    return module


def with_chunk_frames(frames: int, wave: np.ndarray) -> torch.Tensor:
    """`log_mel_spectrogram` with `frames` frames per chunk, whatever the thread count."""
    default = mel._chunk_frames
    mel._chunk_frames = lambda kernel, threads: frames
    try:
        return log_mel_spectrogram(wave)
    finally:
        mel._chunk_frames = default


def with_kernel(name: str, wave: np.ndarray) -> torch.Tensor:
    """`log_mel_spectrogram` with kernel "c" or "torch" in place of the one loaded."""
    original = mel_kernel._kernel
    loaded = original()
    if name == "c" and loaded is None:
        raise RuntimeError("no compiled log-mel kernel to time")
    forced = None if name == "torch" else dataclasses.replace(loaded, mkl=False)
    mel_kernel._kernel = lambda: forced
    try:
        return log_mel_spectrogram(wave)
    finally:
        mel_kernel._kernel = original


def variants(wave: np.ndarray, compare_ref: str | None, chunk_sweep: list[int]) -> dict[str, Callable[[], torch.Tensor]]:
    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, hop_length=160, n_fft=400)
    fns = {
        "hf": lambda: extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="longest",
                                truncation=False)["input_features"][0],
        "hf-qwen": lambda: extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True,
                                     truncation=False, return_attention_mask=True)["input_features"][0],
        "hf-fbank": lambda: torch.from_numpy(extractor._torch_extract_fbank_features(wave[None]))[0],
        "ours": lambda: log_mel_spectrogram(wave),
        "ours-torch": lambda: with_kernel("torch", wave),
    }
    if mel_kernel.active_kernel() == "c-mkl":
        fns["ours-c"] = lambda: with_kernel("c", wave)
    if compare_ref:
        fns[f"ours@{compare_ref}"] = lambda old=mel_module_at(compare_ref): old.log_mel_spectrogram(wave)
    for frames in chunk_sweep:
        fns[f"ours/{frames}"] = lambda frames=frames: with_chunk_frames(frames, wave)
    return fns


def print_profile(name: str, fn: Callable[[], torch.Tensor], calls: int = 5, rows: int = 10) -> None:
    """Self CPU time per ATen op, per call of `fn`, largest first."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / calls / 1e3
    print(f"\n{name}: {total:.1f} ms of self CPU time per call under the profiler")
    for event in events[:rows]:
        ms = event.self_cpu_time_total / calls / 1e3
        print(f"  {event.key:<24}{ms:8.1f} ms {ms / total:6.1%}  {event.count // calls:5d} calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--compare-ref", default=None, help="also time log_mel_spectrogram at this git revision")
    parser.add_argument("--chunk-sweep", default="", help="comma-separated frames per chunk to time ours with")
    parser.add_argument("--profile", action="store_true", help="print the per-op time of hf-fbank and ours")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wave = synthetic_clip(args.minutes)
    fns = variants(wave, args.compare_ref, [int(n) for n in args.chunk_sweep.split(",") if n])
    reference = fns["hf"]()
    diffs = {name: (fn() - reference).abs().max().item() for name, fn in fns.items()}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - cpu_start)
            wall[name].append(time.perf_counter() - wall_start)
    hf_wall, hf_cpu = np.median(wall["hf"]), np.median(cpu["hf"])
    print(f"clip {args.minutes:g} min, {wave.size} samples, torch threads {torch.get_num_threads()}, "
          f"{args.repeats} interleaved repeats, medians; ours uses the {mel_kernel.active_kernel()} kernel")
    print(f"{'variant':<16}{'wall ms':>9}{'cpu ms':>9}{'hf/x wall':>11}{'hf/x cpu':>10}{'min wall':>10}"
          f"{'max |diff|':>12}")
    for name in fns:
        w, c = np.median(wall[name]), np.median(cpu[name])
        print(f"{name:<16}{w * 1e3:9.1f}{c * 1e3:9.1f}{hf_wall / w:10.2f}x{hf_cpu / c:9.2f}x{min(wall[name]) * 1e3:10.1f}"
              f"{diffs[name]:12.2e}")
    if args.profile:
        for name in ("hf-fbank", "ours-torch"):
            print_profile(name, fns[name])


if __name__ == "__main__":
    main()
