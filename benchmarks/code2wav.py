"""Time code2wav on this CPU: our exact stream, one frame per push, against HF transformers' decodes.

For each width, the same random weights in both models (fp32) and a random code sequence of `--frames` frames:
- `stream`: `Code2WavStream.push` of one frame after another (what the engine does per voice and step);
- `hf-full`: HF `Qwen3OmniMoeCode2Wav.forward` on the whole sequence, per frame of audio (nothing streamed);
- `hf-chunked`: HF `chunked_decode` (300-frame chunks, 25 frames of left context), per frame;
- `hf-redecode`: what a stateless stream pays per new frame: HF `forward` over the last 11 frames (the
  ConvNet's receptive field; it ignores the transformer's 568-frame one, so it is not even exact).
Each row gives ms per frame and the real-time factor (time per frame / 80 ms of audio); medians over frames or
`--repeats`. Widths: `tiny` is the embedded model's vocoder (hidden 64, decoder 96, 2 layers); `real` has
Qwen3-Omni's widths (hidden 1024, MLP 3072, 16 heads, decoder 1536) with `--real-layers` layers instead of 8.
Example (about a minute on one core):
    python benchmarks/code2wav.py --threads 1 --frames 40
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import Qwen3OmniMoeCode2Wav
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig

from omnistream.engine.checkpoint.default_model import PRESETS
from omnistream.engine.checkpoint.default_speech import code2wav_config
from omnistream.engine.checkpoint.speech_config import parse_code2wav_config
from omnistream.engine.model_executor.models.code2wav import Code2Wav
from omnistream.engine.model_executor.models.code2wav_stream import (
    REFERENCE_CONTEXT_FRAMES,
    Code2WavStream,
)

FRAME_S = 0.08
REAL = dict(
    hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=16, decoder_dim=1536
)


def build(raw: dict) -> tuple[Code2Wav, Qwen3OmniMoeCode2Wav]:
    """HF's model with seeded fan-in weights, and ours loaded from its state dict."""
    hf = Qwen3OmniMoeCode2Wav._from_config(
        Qwen3OmniMoeCode2WavConfig(**raw), attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(0.3 * noise if param.dim() == 1 else noise / param[0].numel() ** 0.5)
    ours = Code2Wav(parse_code2wav_config(raw)).eval()
    ours.load_weights(hf.state_dict().items())
    return ours, hf


def timed(call: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `call` over `repeats` runs (after one warm-up)."""
    call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@torch.no_grad()
def run(name: str, raw: dict, frames: int, repeats: int) -> None:
    ours, hf = build(raw)
    codes = torch.randint(0, 2048, (1, 16, frames), generator=torch.Generator().manual_seed(1))
    stream, per_frame = Code2WavStream(ours), []
    for t in range(frames):
        start = time.perf_counter()
        stream.push(codes[0, :, t : t + 1])
        per_frame.append(time.perf_counter() - start)
    window = REFERENCE_CONTEXT_FRAMES + 1
    rows = {
        "stream": statistics.median(per_frame[1:]),
        "hf-full": timed(lambda: hf(codes), repeats) / frames,
        "hf-chunked": timed(lambda: hf.chunked_decode(codes), repeats) / frames,
        "hf-redecode": timed(lambda: hf(codes[..., -window:]), repeats),
    }
    for variant, seconds in rows.items():
        print(f"{name:5s} {variant:12s} {seconds * 1e3:9.2f} ms/frame  RTF {seconds / FRAME_S:7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-layers", type=int, default=2)
    parser.add_argument("--widths", default="tiny,real")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = code2wav_config(PRESETS["tiny"]["speech"])
    configs = {"tiny": tiny, "real": dict(tiny, **REAL, num_hidden_layers=args.real_layers)}
    print(f"threads {args.threads}, {args.frames} frames, fp32")
    for name in args.widths.split(","):
        run(name, configs[name], args.frames, args.repeats)


if __name__ == "__main__":
    main()
