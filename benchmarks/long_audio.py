"""Long-audio prefill: a 40-minute clip through LLM.generate on the embedded default model.

Prints wall time, peak RSS and the prompt's token count (checked against the audio token formula).
Usage: python benchmarks/long_audio.py [--minutes 40] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from omnistream import LLM, SamplingParams
from omnistream.multimodal.placeholders import audio_token_count

PROMPT = "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>Summarize.<|im_end|>\n<|im_start|>assistant\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    n = int(args.minutes * 60 * 16000)
    t = np.arange(n, dtype=np.float32) / 16000
    noise = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    wave = (0.01 * np.sin(2 * np.pi * 440 * t) + 0.003 * noise).astype(np.float32)
    del t, noise
    expected_audio = audio_token_count(n // 160)

    llm = LLM(dtype="float32", device=args.device, num_kv_blocks=expected_audio // 16 + 64)
    start = time.perf_counter()
    out = llm.generate({"prompt": PROMPT, "multi_modal_data": {"audio": (wave, 16000)}},
                       SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    expected = len(llm.get_tokenizer().encode(PROMPT)) - 1 + expected_audio
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(f"audio {args.minutes:g} min: {len(out.prompt_token_ids)} prompt tokens "
          f"({expected_audio} audio; formula total {expected}), {elapsed:.1f} s, peak RSS {peak_mib:.0f} MiB, "
          f"finish={out.outputs[0].finish_reason}")
    if len(out.prompt_token_ids) != expected:
        raise SystemExit("prompt token count does not match the audio token formula")


if __name__ == "__main__":
    main()
