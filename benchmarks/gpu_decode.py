"""Decode step time through the engine's own scheduler and model runner, as users run it (CUDA graphs on).

Owns `DecodeBench`: a loaded model, a Scheduler and a ModelRunner (enforce_eager off, so decode-only steps
replay the runner's captured graphs on CUDA), and the timing of one engine step, schedule → execute → update,
between two device synchronisations. For each batch size B, B requests with `context` random prompt tokens are
prefilled, then every step in which exactly those B requests each decode one token is timed; the first two are
warm-up. The model runs the real forward on random weights, so routing (and with it the experts read) is real.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from omnistream.engine.worker.model_runner import ModelRunner
from omnistream.scheduler.request import Request
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig

BLOCK_SIZE = 16
WARMUP_STEPS = 2
_PREFILL_BUDGET = 8192  # tokens per prefill step


class DecodeBench:
    def __init__(
        self, model: torch.nn.Module, device: torch.device, max_batch: int, context: int, max_steps: int
    ) -> None:
        self.model, self.device, self.context = model, device, context
        self.max_model_len = context + max_steps + WARMUP_STEPS + 2
        num_blocks = max_batch * -(-self.max_model_len // BLOCK_SIZE)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_model_len=self.max_model_len,
                num_kv_blocks=num_blocks,
                max_num_seqs=max_batch,
                max_num_batched_tokens=_PREFILL_BUDGET,
                block_size=BLOCK_SIZE,
                enable_prefix_caching=False,
            )
        )
        start = time.perf_counter()
        self.runner = ModelRunner(
            model,
            num_kv_blocks=num_blocks,
            block_size=BLOCK_SIZE,
            dtype=next(model.parameters()).dtype,
            device=device,
            eos_token_ids=[],
            max_num_seqs=max_batch,
            max_model_len=self.max_model_len,
            enforce_eager=False,
        )
        self.runner_setup_s = time.perf_counter() - start  # includes capturing the decode graphs
        self.rng = random.Random(0)
        self.num_added = 0

    @property
    def graphs_on(self) -> bool:
        return self.runner.decode_graphs is not None

    def start(self, batch: int, decode_steps: int) -> None:
        """Add `batch` requests that will decode `decode_steps` tokens after their first (sampled at prefill)."""
        params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True)
        vocab = self.model.config.text.vocab_size
        for _ in range(batch):
            prompt = [self.rng.randrange(100, min(vocab, 150_000)) for _ in range(self.context)]
            self.scheduler.add_request(Request(f"r{self.num_added}", prompt, params, [], arrival_time=time.time()))
            self.num_added += 1

    def step(self) -> tuple[float, bool]:
        """One engine step, synchronised: (seconds, whether it was a decode step of every running request)."""
        self._synchronize()
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        output = self.runner.execute_model(scheduler_output)
        self.scheduler.update_from_output(scheduler_output, output)
        self._synchronize()
        elapsed = time.perf_counter() - start
        counts = scheduler_output.num_scheduled_tokens
        is_decode = bool(counts) and all(n == 1 for n in counts.values()) and not scheduler_output.scheduled_new_reqs
        return elapsed, is_decode

    def drain(self) -> list[float]:
        """Run until every request has finished; the decode step times after the warm-up."""
        times = []
        decodes = 0
        while self.scheduler.has_unfinished_requests():
            elapsed, is_decode = self.step()
            if is_decode:
                decodes += 1
                if decodes > WARMUP_STEPS:
                    times.append(elapsed)
        self.step()  # the last finished requests leave the runner
        return times

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def decode_rows(
    bench: DecodeBench, batches: list[int], steps: int, emit: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """Median decode step per batch size (emitting the rows so far after each)."""
    rows: list[dict[str, Any]] = []
    for batch in batches:
        bench.start(batch, steps + WARMUP_STEPS)
        times = bench.drain()
        median = statistics.median(times)
        rows.append(
            {
                "batch": batch,
                "step_ms": median * 1e3,
                "p10_ms": _quantile(times, 0.1) * 1e3,
                "p90_ms": _quantile(times, 0.9) * 1e3,
                "steps": len(times),
                "output_tok_s": batch / median,
            }
        )
        emit(rows)
    return rows


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
