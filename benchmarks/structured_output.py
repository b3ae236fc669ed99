"""Structured outputs: what the grammar costs. Four figures, each against its baseline in the same run.

1. Decode step at `--batch` rows (default 64) on the embedded model with every row constrained by a JSON
   schema vs the same workload unconstrained (greedy, same prompts), interleaved `--repeats` times; the
   median step times, their difference as a share of the unconstrained step, and its parts per step: the
   engine core naming the rows, llguidance filling masks (summed over the threads that fill: beside the
   forward, or on demand: engine/core/structured_output/masks.py), the runner waiting for them, the greedy
   head (masked inside the compiled kernel, or keeping each row's best ids, checking them against the grammar
   and filling masks for the rows left, with a masked pass over those: greedy_head.checked_greedy_tokens),
   the checks alone, applying the masks or correcting the greedy head's tokens, and the matchers advancing;
   and how many rows per step their best ids settled and how many masks were filled, beside the forward (on
   the filler's threads) and after the head. With `--compare-correction`
   the constrained workload also runs with the masked head switched off (the unmasked head, then the rows whose
   grammar rejects their token are recomputed), interleaved in the same run.
2. Compiling a large JSON schema (`--fields` properties) the first time and again (cached).
3. With `--backends llguidance,xgrammar`: both libraries on the same schema and vocabulary: compile time
   and the time to fill the masks of `--batch` matchers per step along a valid document.
4. With `--fill` (instead of 1-3): llguidance's fill alone for `--batch` matchers of the step's schema: CPU per
   step with its default slices and with ours (compiler.STRING_SLICES), and two threads on one template's copies
   (one shared lock) against one template each (masks.py).
5. With `--hit-rate` (instead of 1-3): on the step's workload, with every mask filled, the share of constrained
   rows whose masked greedy token is among their K best unmasked ids, for K from 1 to 64 (what the checked ids
   of greedy_head.KEPT_IDS catch), and how many tokens the masks of the other rows allow.

    python benchmarks/structured_output.py [--batch 64] [--steps 24] [--repeats 3] [--threads 1] [--masks auto]
                                           [--compare-correction] [--backends llguidance] [--fill] [--hit-rate]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from omnistream.engine.core.request import EngineCoreRequest
from omnistream.engine.core.structured_output import masks
from omnistream.engine.entrypoints.llm import LLM
from omnistream.engine.worker import greedy_head, model_runner
from omnistream.engine.worker.token_bitmask import StepBitmask, unpack_on_host
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.structured_outputs import StructuredOutputsParams

STEP_SCHEMA = {  # long enough that no row completes within the measured steps
    "type": "object",
    "properties": {
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 40},
        "level": {"enum": ["low", "high"]},
    },
    "required": ["notes", "level"],
    "additionalProperties": False,
}


def large_schema(fields: int) -> dict:
    kinds = [
        {"type": "string", "maxLength": 32},
        {"type": "integer", "minimum": 0},
        {"type": "boolean"},
        {"type": "array", "items": {"type": "number"}},
        {"enum": ["a", "b", "c"]},
    ]
    props = {f"field_{i}": kinds[i % len(kinds)] for i in range(fields)}
    return {
        "type": "object",
        "properties": props,
        "required": list(props)[: fields // 4],
        "additionalProperties": False,
    }


class _Timer:
    """Wraps functions (or methods) to add their wall time to `total`."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        return timed


def decode_steps(llm: LLM, batch: int, steps: int, spec: StructuredOutputsParams | None, tag: str) -> list[float]:
    """Times of `steps` decode steps of `batch` greedy requests (prefill excluded)."""
    core = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True, structured_outputs=spec)
    ids = [f"{tag}-{i}" for i in range(batch)]
    for i, req_id in enumerate(ids):
        prompt = [1000 + (i * 37 + j) % 5000 for j in range(24)]
        core.add_request(
            EngineCoreRequest(
                request_id=req_id, prompt_token_ids=prompt, sampling_params=params, arrival_time=time.monotonic()
            )
        )
    while any(core.scheduler.requests[r].num_output_tokens == 0 for r in ids):  # prefill (and compile)
        core.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        core.step()
        times.append(time.perf_counter() - start)
    core.abort_requests(ids)
    core.step()
    return times


def engine_figures(args: argparse.Namespace) -> dict:
    llm = LLM(dtype="float32", max_num_seqs=args.batch, num_kv_blocks=args.batch * 6)
    manager = llm.engine.structured_output
    manager.fill_mode = args.masks
    select, fill, wait, apply = _Timer(), _Timer(), _Timer(), _Timer()
    kinds, fill_bitmask = set(), manager.fill_bitmask

    def noting_kind(*args):
        masks = fill_bitmask(*args)
        kinds.add(type(masks).__name__)
        return masks

    manager.fill_bitmask = select.wrap(noting_kind)
    masks.RowQueue.fill = fill.wrap(masks.RowQueue.fill)
    StepBitmask.from_scheduler_output = wait.wrap(StepBitmask.from_scheduler_output)
    StepBitmask.apply = apply.wrap(StepBitmask.apply)
    StepBitmask.correct_greedy = apply.wrap(StepBitmask.correct_greedy)
    advance, head, check = _Timer(), _Timer(), _Timer()
    manager.advance = advance.wrap(manager.advance)
    model_runner.greedy_tokens = head.wrap(model_runner.greedy_tokens)
    model_runner.checked_greedy_tokens = head.wrap(model_runner.checked_greedy_tokens)
    settled, beside, after = [], [], []
    first_allowed, fill_into = masks.MasksOnDemand.first_allowed, masks.MaskFiller.fill_into

    def counted_checks(self, rows, candidates):
        chosen = first_allowed(self, rows, candidates)
        settled.append(sum(token >= 0 for token in chosen))
        return chosen

    def counted_fills(self, rows, bitmask):
        on_filler = threading.current_thread().name.startswith("grammar-mask")
        (beside if on_filler else after).append(len(rows))
        return fill_into(self, rows, bitmask)

    masks.MasksOnDemand.first_allowed = check.wrap(counted_checks)
    masks.MaskFiller.fill_into = counted_fills
    timers = (select, fill, wait, head, check, apply, advance)
    spec = StructuredOutputsParams(json=json.dumps(STEP_SCHEMA))
    plain, constrained, corrected = [], [], []
    masked_head_serves = model_runner.masked_greedy_serves
    decode_steps(llm, args.batch, 4, None, "warm")
    for r in range(args.repeats):
        head.total = 0.0
        plain += decode_steps(llm, args.batch, args.steps, None, f"plain{r}")
        plain_head = head.total / args.steps * 1e3
        for timer in timers:
            timer.total = 0.0
        for counts in (settled, beside, after):
            counts.clear()
        constrained += decode_steps(llm, args.batch, args.steps, spec, f"json{r}")
        parts = [timer.total / args.steps * 1e3 for timer in timers]
        if args.compare_correction:
            model_runner.masked_greedy_serves = lambda lm_head, dtype: False
            corrected += decode_steps(llm, args.batch, args.steps, spec, f"corrected{r}")
            model_runner.masked_greedy_serves = masked_head_serves
    compiler = manager.compiler
    big = StructuredOutputsParams(json=json.dumps(large_schema(args.fields)))
    start = time.perf_counter()
    compiler.compile(big)
    first = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile(big)
    cached = time.perf_counter() - start
    base, masked = statistics.median(plain) * 1e3, statistics.median(constrained) * 1e3
    figures = {
        "batch": args.batch,
        "step_ms_unconstrained": base,
        "step_ms_constrained": masked,
        "mask_share_of_step": (masked - base) / base,
        "masked_greedy_head": masked_head_serves(llm.engine.executor.model.lm_head, torch.float32),
        "masks_filled": sorted(kinds - {"NoneType"}),
        "greedy_head_ms_unconstrained_last_repeat": plain_head,
        "per_step_ms_last_repeat": dict(
            zip(
                [
                    "select_rows",
                    "fill_masks",
                    "runner_waits_for_masks",
                    "greedy_head",
                    "check_best_ids",
                    "apply_or_correct",
                    "matchers_advance",
                ],
                parts,
            )
        ),
        "rows_per_step_last_repeat": {
            "settled_by_best_ids": sum(settled) / args.steps,
            "masks_filled_beside_forward": sum(beside) / args.steps,
            "masks_filled_after_head": sum(after) / args.steps,
        },
    }
    if corrected:
        figures["step_ms_constrained_corrected"] = statistics.median(corrected) * 1e3
        figures["mask_share_of_step_corrected"] = (figures["step_ms_constrained_corrected"] - base) / base
    figures.update(
        {"large_schema_fields": args.fields, "compile_ms_first": first * 1e3, "compile_ms_cached": cached * 1e3}
    )
    return figures


def hit_figures(args: argparse.Namespace) -> dict:
    """Ranks of the masked greedy tokens among the unmasked logits (value descending, id ascending), every mask
    filled beside the forward so that the masked head has them all: the share of rows with rank < K."""
    llm = LLM(dtype="float32", max_num_seqs=args.batch, num_kv_blocks=args.batch * 6)
    llm.engine.structured_output.fill_mode = "beside"
    ranks, widths = [], []
    greedy_tokens = model_runner.greedy_tokens

    def ranked(lm_head, hidden, allowed=None):
        tokens = greedy_tokens(lm_head, hidden, allowed)
        if allowed is not None:
            logits = hidden.float() @ lm_head.weight.float().T
            ids = torch.arange(logits.shape[1])
            for row, token in enumerate(tokens.tolist()):
                best = logits[row, token]
                ahead = (logits[row] > best) | ((logits[row] == best) & (ids < token))
                ranks.append(int(ahead.sum()))
            widths.extend(unpack_on_host(allowed, logits.shape[1]).sum(dim=1).tolist())
        return tokens

    model_runner.greedy_tokens = ranked
    decode_steps(llm, args.batch, args.steps, StructuredOutputsParams(json=json.dumps(STEP_SCHEMA)), "ranks")
    k = greedy_head.KEPT_IDS
    others = sorted(width for rank, width in zip(ranks, widths) if rank >= k)
    return {
        "rows": len(ranks),
        "share_within_top_k": {n: sum(r < n for r in ranks) / len(ranks) for n in (1, 2, 4, 8, 16, 32, 64)},
        f"allowed_tokens_of_rows_past_top_{k}": {
            "rows": len(others),
            "median": statistics.median(others) if others else None,
            "at_most_300": sum(w <= 300 for w in others),
        },
    }


def fill_figures(args: argparse.Namespace) -> dict:
    """llguidance alone, `--batch` matchers of STEP_SCHEMA along random valid outputs (the same with any slices):
    CPU time per step to fill their masks on one thread, with llguidance's default slices and with the compiler's
    STRING_SLICES, and the time to build each tokenizer; then the wall time per step on two threads with one
    compiled template (its copies share one lock) and with one template per thread."""
    import llguidance

    from omnistream.engine.checkpoint.default_model import default_model_path
    from omnistream.engine.checkpoint.tokenizer import Tokenizer
    from omnistream.engine.core.structured_output.compiler import JSON_OPTIONS, STRING_SLICES

    tokenizer = Tokenizer(default_model_path())
    grammar = llguidance.LLMatcher.grammar_from_json_schema(STEP_SCHEMA, defaults=JSON_OPTIONS)
    result = {}
    for name, slices in (("default_slices", None), ("string_slices", STRING_SLICES)):
        start = time.process_time()
        llg_tok = llguidance.LLTokenizer(
            tokenizer.to_json(), n_vocab=152064, eos_token=tokenizer.eos_token_ids, slices=slices
        )
        build = time.process_time() - start
        cpu, _ = _fill_steps(llg_tok, grammar, args, templates=1, threads=1)
        result[name] = {"tokenizer_build_cpu_s": build, "fill_cpu_ms_per_step": cpu}
    for templates in (1, 2):
        cpu, wall = _fill_steps(llg_tok, grammar, args, templates=templates, threads=2)
        result[f"two_threads_{templates}_templates"] = {"fill_ms_per_step": wall, "cpu_ms_per_step": cpu}
    return result


def _fill_steps(llg_tok, grammar: str, args: argparse.Namespace, templates: int, threads: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per step filling the masks of `--batch` matchers, row i copied from template i % templates
    and filled by thread i % threads, over `--steps` steps; each row then takes a random allowed token."""
    import llguidance
    import numpy as np

    sources = [llguidance.LLMatcher(llg_tok, grammar, log_level=0) for _ in range(templates)]
    rows = [masks.MaskRow(sources[i % templates].deep_copy(), i, i % threads) for i in range(args.batch)]
    filler = masks.MaskFiller(llg_tok.vocab_size, threads)
    rng = np.random.default_rng(0)
    cpu = wall = 0.0
    for _ in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        bitmask = filler.fill(rows, len(rows))
        wall += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
        for row in rows:
            row.matcher.consume_token(int(rng.choice(np.flatnonzero(bits[row.row]))))
    filler.shutdown()
    return cpu / args.steps * 1e3, wall / args.steps * 1e3


def backend_figures(args: argparse.Namespace) -> dict:
    from omnistream.engine.checkpoint.default_model import default_model_path
    from omnistream.engine.checkpoint.tokenizer import Tokenizer

    tokenizer = Tokenizer(default_model_path())
    vocab, eos = 152064, tokenizer.eos_token_ids
    schema = large_schema(args.fields)
    doc = json.dumps({f"field_{i}": ["abc", 3, True, [1.5], "b"][i % 5] for i in range(args.fields // 4)})
    tokens = tokenizer.encode(doc)[:40]
    result = {}
    for backend in args.backends:
        if backend == "llguidance":
            import llguidance
            import llguidance.torch as lt

            llg_tok = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab, eos_token=eos)
            start = time.perf_counter()
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            template = llguidance.LLMatcher(llg_tok, grammar)
            compile_s = time.perf_counter() - start
            matchers = [template.deep_copy() for _ in range(args.batch)]
            executor = llguidance.LLExecutor(num_threads=2)
            mask = lt.allocate_token_bitmask(args.batch, vocab)

            def fill(executor=executor, matchers=matchers, mask=mask) -> None:
                lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)

            def advance(token: int, matchers=matchers) -> None:
                for m in matchers:
                    m.consume_token(token)
        else:
            import xgrammar
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast(tokenizer_file=str(default_model_path() / "tokenizer.json"))
            info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
            compiler = xgrammar.GrammarCompiler(info, max_threads=2)
            start = time.perf_counter()
            compiled = compiler.compile_json_schema(json.dumps(schema))
            compile_s = time.perf_counter() - start
            matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(args.batch)]
            mask = xgrammar.allocate_token_bitmask(args.batch, vocab)

            def fill(matchers=matchers, mask=mask) -> None:
                for i, m in enumerate(matchers):
                    m.fill_next_token_bitmask(mask, i)

            def advance(token: int, matchers=matchers) -> None:
                for m in matchers:
                    m.accept_token(token)

        times = []
        for token in tokens:
            start = time.perf_counter()
            fill()
            times.append(time.perf_counter() - start)
            advance(token)
        result[backend] = {
            "compile_ms": compile_s * 1e3,
            "fill_ms_median": statistics.median(times) * 1e3,
            "fill_ms_max": max(times) * 1e3,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fields", type=int, default=200, help="properties of the large schema")
    parser.add_argument("--backends", type=lambda s: s.split(","), default=[])
    parser.add_argument("--fill", action="store_true", help="only figure 4: llguidance's fill, its slices and locks")
    parser.add_argument("--hit-rate", action="store_true", help="only figure 5: masked tokens among the best ids")
    parser.add_argument(
        "--masks",
        choices=["auto", "beside", "on-demand"],
        default="auto",
        help="fill the masks beside the forward or on demand (auto: the engine's choice)",
    )
    parser.add_argument(
        "--compare-correction",
        action="store_true",
        help="also time the constrained workload with the masked greedy head switched off",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fill:
        figures = {"fill": fill_figures(args)}
    elif args.hit_rate:
        figures = {"hit_rate": hit_figures(args)}
    else:
        figures = {"engine": engine_figures(args)}
    if args.backends:
        figures["backends"] = backend_figures(args)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
