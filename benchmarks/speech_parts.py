"""CPU time of the speech lane's parts for one step of B voices, outside the engine: the code predictor block
(a frame's 15 codebooks for every voice) and code2wav (one new frame per voice, streaming), on the embedded
tiny model (or a checkpoint), fp32, one thread by default. Reports the median of `--rounds` rounds, each the
mean of `--iters` calls, in process CPU ms (free of waiting on a loaded box), and the number of torch ops one
call dispatches (exact, noise-free: each is a kernel launch on a GPU and a few µs of overhead on a CPU). Run it with another PYTHONPATH to
compare code, e.g. alternating base and yours:
    PYTHONPATH=/work/pp-base python benchmarks/speech_parts.py --voices 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.models.code2wav_voices import Code2WavVoices
from omnistream.engine.model_executor.speech_loader import load_speech_models
from omnistream.engine.worker.code_predictor_block import CodePredictorBlock
from omnistream.engine.worker.speech_sampler import SpeechDraws


def cpu_ms(call: Callable[[int], object], iters: int, rounds: int) -> float:
    """Median over rounds of the mean process CPU ms of `iters` calls (call(i), i counting on)."""
    for i in range(3):
        call(i)
    times, count = [], 3
    for _ in range(rounds):
        began = time.process_time()
        for _ in range(iters):
            call(count)
            count += 1
        times.append(1e3 * (time.process_time() - began) / iters)
    return statistics.median(times)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def num_ops(call: Callable[[int], object], index: int) -> int:
    """The torch ops one call dispatches (as the dispatcher sees them, composites decomposed)."""
    with _OpCounter() as counter:
        call(index)
    return counter.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--voices", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = load_speech_models(args.model or default_model_path(), torch.float32)
    voices, generator = args.voices, torch.Generator().manual_seed(0)
    hidden_size = models.talker.config.text.hidden_size
    with torch.inference_mode():
        block = CodePredictorBlock(models.talker.code_predictor, voices)
        hidden = torch.randn(voices, hidden_size, generator=generator)
        c0_embeds = torch.randn(voices, hidden_size, generator=generator)
        seeds, sample = torch.arange(voices), torch.ones(voices, dtype=torch.bool)

        def predict(frame: int) -> object:
            return block(hidden, c0_embeds, SpeechDraws(seeds, torch.full((voices,), frame), sample), False)

        streams = Code2WavVoices(models.code2wav, voices)
        names = [f"voice-{i}" for i in range(voices)]
        codes = torch.randint(0, models.code2wav.config.codebook_size, (512, voices, 16, 1), generator=generator)

        def vocode(frame: int) -> object:
            return streams.push(names, codes[frame % len(codes)])

        predict_ms, vocode_ms = cpu_ms(predict, args.iters, args.rounds), cpu_ms(vocode, args.iters, args.rounds)
        predict_ops, vocode_ops = num_ops(predict, 10**6), num_ops(vocode, 10**6)
        print(
            f"{voices} voices, CPU per step: code predictor block {predict_ms:.2f} ms ({predict_ops} ops), "
            f"code2wav push {vocode_ms:.2f} ms ({vocode_ops} ops)"
        )


if __name__ == "__main__":
    main()
