"""Time omnistream's log-mel against HF `WhisperFeatureExtractor` on a synthetic 10-minute clip.

Checks the largest absolute difference and prints the speed ratio (best of N interleaved runs each). Example:
    python benchmarks/mel.py --minutes 10 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from omnistream.multimodal.mel import SAMPLE_RATE, log_mel_spectrogram


def synthetic_clip(minutes: float, seed: int = 0) -> np.ndarray:
    """A gliding tone plus noise with a slow loudness envelope, float32 at 16 kHz."""
    t = np.arange(int(minutes * 60 * SAMPLE_RATE)) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * (200 + 50 * t % 3000) * t) * (0.5 + 0.4 * np.sin(2 * np.pi * t / 7))
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.02
    return (0.3 * tone + noise).astype(np.float32)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wave = synthetic_clip(args.minutes)
    extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, hop_length=160, n_fft=400)

    def hf() -> torch.Tensor:
        out = extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="longest", truncation=False)
        return out["input_features"][0]

    def ours() -> torch.Tensor:
        return log_mel_spectrogram(wave)

    diff = (hf() - ours()).abs().max().item()
    hf_s, ours_s = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        hf_s = min(hf_s, seconds(hf))
        ours_s = min(ours_s, seconds(ours))
    print(f"clip {args.minutes:g} min, {wave.size} samples, torch threads {torch.get_num_threads()}")
    print(f"HF WhisperFeatureExtractor: {hf_s * 1e3:8.1f} ms")
    print(f"omnistream log_mel:         {ours_s * 1e3:8.1f} ms")
    print(f"speed ratio: {hf_s / ours_s:.2f}x   max abs diff: {diff:.2e}")


if __name__ == "__main__":
    main()
