"""Per-step host cost of the engine around the model, per running request: the scheduler (schedule +
update_from_output) and the model runner's input preparation (reading the SchedulerOutput into the slot tables,
building the flat batch and its attention metadata), at --running decoding requests. Target: <= 5 us per request.

The requests (prompts of --prompt-len random tokens, greedy, no stop) are prefilled first; then --steps decode
steps are timed, each fed a fake sampled token per request (made outside the timings; the model itself is not
run: the runner holds the embedded tiny model only for its KV-cache shape). Reported: median thread CPU us per
step and per request of each part, and their sum. Which attention backend is configured does not matter here.

    python benchmarks/step_overhead.py
    python benchmarks/step_overhead.py --running 64,256 --steps 100
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.worker.model_runner import ModelRunner
from omnistream.scheduler.outputs import ModelRunnerOutput
from omnistream.scheduler.request import Request
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.scheduler import Scheduler, SchedulerConfig

BLOCK = 16


def fake_output(ids: list[str], rng: random.Random) -> ModelRunnerOutput:
    """A random token for every request the runner's batch samples."""
    return ModelRunnerOutput(sampled_req_ids=ids, sampled_token_ids=[rng.randrange(100, 1000) for _ in ids],
                             logprobs=[None] * len(ids))


def run(model: torch.nn.Module, running: int, prompt_len: int, steps: int) -> dict:
    rng = random.Random(0)
    num_blocks = running * (-(-(prompt_len + steps + 8) // BLOCK) + 1)
    scheduler = Scheduler(SchedulerConfig(max_model_len=prompt_len + steps + 8, num_kv_blocks=num_blocks,
                                          max_num_seqs=running, max_num_batched_tokens=8192, block_size=BLOCK,
                                          enable_prefix_caching=False))
    runner = ModelRunner(model, num_kv_blocks=num_blocks, block_size=BLOCK, dtype=torch.float32,
                         device=torch.device("cpu"), eos_token_ids=[2], max_num_seqs=running,
                         max_model_len=prompt_len + steps + 8)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(running):
        prompt = [rng.randrange(100, 150000) for _ in range(prompt_len)]
        scheduler.add_request(Request(f"r{i}", prompt, params, [2], arrival_time=float(i)))
    times: dict[str, list[float]] = {"schedule": [], "update": [], "runner": []}
    decoding = 0
    while decoding < steps:
        t0 = time.thread_time()
        so = scheduler.schedule()
        t1 = time.thread_time()
        runner._update_states(so)
        batch = runner._prepare_inputs(so)
        t2 = time.thread_time()
        output = fake_output(batch.sample_req_ids, rng)  # stands in for the model: not host cost, not timed
        t2b = time.thread_time()
        scheduler.update_from_output(so, output)
        t3 = time.thread_time()
        if len(so.num_scheduled_tokens) == running and so.total_num_scheduled_tokens == running:
            decoding += 1
            for name, seconds in (("schedule", t1 - t0), ("runner", t2 - t1), ("update", t3 - t2b)):
                times[name].append(seconds)
    medians = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    total = sum(medians.values())
    return {"running": running, **{f"{name}_us": us for name, us in medians.items()}, "total_us": total,
            "per_request_us": total / running, "scheduler_per_request_us": (medians["schedule"] + medians["update"])
            / running, "runner_per_request_us": medians["runner"] / running}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--running", default="256", help="comma-separated numbers of running requests")
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50, help="timed decode steps")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(default_model_path(), "float32")[0]
    rows = [run(model, int(n), args.prompt_len, args.steps) for n in args.running.split(",")]
    print(f"Host cost of a decode step around the model (thread CPU, medians of {args.steps} steps)")
    print(f"{'running':>8} {'schedule us':>12} {'runner prep us':>15} {'update us':>10} {'per request us':>15} "
          f"{'scheduler':>10} {'runner':>8}")
    for r in rows:
        print(f"{r['running']:>8} {r['schedule_us']:>12.0f} {r['runner_us']:>15.0f} {r['update_us']:>10.0f} "
              f"{r['per_request_us']:>15.2f} {r['scheduler_per_request_us']:>10.2f} "
              f"{r['runner_per_request_us']:>8.2f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
