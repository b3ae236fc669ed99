"""StructuredOutputManager: the engine core's matchers, one per constrained request (or session turn).

A request whose grammar is not compiled yet is added to the scheduler marked `grammar_pending`, which the
scheduler skips; the grammar compiles on a worker thread while other requests keep stepping, and the
request is released when it is ready. Each step, the rows that sample under a grammar get their bitmask of
allowed tokens, filled by llguidance while the step's forward runs where a core is free for it, or when the
runner asks after the forward, and then only for the rows where the greedy head's best ids do not settle it
(masks.py): on a CPU for a step whose sampling rows are all plain greedy, and where no core is free.
With tensor parallelism the executor waits for the masks and broadcasts them in the step, so they are
computed once, on rank 0, and every rank receives the same bytes. After the step each matcher consumes its
sampled token, and a matcher that has stopped (the output is complete and nothing may follow) ends its
request. A matcher whose count of consumed tokens differs from the request's outputs (e.g. after a preemption
recomputed the request) is rebuilt from its compiled grammar and replays the output tokens.
Requests of one spec take turns among its lineages (one template per thread that fills masks, masks.py); the
lineages past the first compile in the background, and a request moves to its own (a replay) once it is built.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass
from typing import Literal

import llguidance

from omnistream.engine.core.structured_output.compiler import GrammarCompiler
from omnistream.engine.core.structured_output.masks import (
    MaskFiller,
    MaskRow,
    MasksBesideForward,
    MasksOnDemand,
    mask_threads,
)
from omnistream.scheduler.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from omnistream.scheduler.request import Request
from omnistream.scheduler.structured_outputs import StructuredOutputsParams

logger = logging.getLogger(__name__)

COMPILE_THREADS = 1


@dataclass
class _Grammar:
    spec: StructuredOutputsParams
    lineage: int  # the template this request's matcher should copy, once it is built
    template: llguidance.LLMatcher  # the compiler's template it copies now (lineage 0 until its own is built)
    matcher: llguidance.LLMatcher
    num_consumed: int = 0  # output tokens the matcher has consumed


class StructuredOutputManager:
    def __init__(self, compiler: GrammarCompiler, device_type: str = "cpu") -> None:
        self.compiler = compiler
        threads, self._free_cores = mask_threads(device_type)
        self._device_type = device_type
        self.fill_mode: Literal["auto", "beside", "on-demand"] = "auto"  # where masks are filled (masks.py)
        self._filler = MaskFiller(compiler.vocab_size, threads)
        self.num_lineages = threads + 1  # the filler's threads and the runner's
        self._pool = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS, "grammar-compile")
        self._filling: MasksBesideForward | MasksOnDemand | None = None  # this step's masks
        self._compiling: dict[str, tuple[StructuredOutputsParams, concurrent.futures.Future]] = {}
        self._grammars: dict[str, _Grammar] = {}
        self._num_attached = 0  # spreads requests over the lineages
        self._growing: set[tuple[str, str]] = set()  # specs whose lineages are being compiled

    def attach(self, request: Request, spec: StructuredOutputsParams | None) -> None:
        """Give `request` (new, or a session at a new turn) the grammar of `spec`: at once when compiled
        already, else mark it pending and compile in the background. None removes a session's grammar."""
        req_id = request.request_id
        self.forget(req_id)
        if spec is None:
            return
        if self.compiler.template(spec) is not None:
            self._grammars[req_id] = self._grammar(spec)
            return
        request.grammar_pending = True
        self._compiling[req_id] = spec, self._pool.submit(self.compiler.compile, spec)

    def forget(self, req_id: str) -> None:
        self._grammars.pop(req_id, None)
        compiling = self._compiling.pop(req_id, None)
        if compiling is not None:
            compiling[1].cancel()

    @property
    def compiling(self) -> bool:
        return bool(self._compiling)

    def release_compiled(self, requests: dict[str, Request], wait_s: float = 0.0) -> list[EngineCoreOutput]:
        """Release requests whose grammar is compiled (waiting up to `wait_s` for one); a grammar that failed
        to compile (the front end validates first, so this is a backstop) aborts its request: returned."""
        if wait_s and self._compiling:
            futures = [future for _, future in self._compiling.values()]
            concurrent.futures.wait(futures, wait_s, concurrent.futures.FIRST_COMPLETED)
        failed = []
        for req_id, (spec, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[req_id]
            request = requests.get(req_id)
            if request is None:
                continue
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - reported as this request's end, the engine goes on
                logger.warning("request %s: its grammar did not compile: %s", req_id, exc)
                failed.append(EngineCoreOutput(req_id=req_id, new_token_ids=[], finish_reason="abort"))
                continue
            self._grammars[req_id] = self._grammar(spec)
            request.grammar_pending = False
        return failed

    def _grammar(self, spec: StructuredOutputsParams) -> _Grammar:
        """A matcher for a new request of the compiled `spec`; the spec's lineages are completed meanwhile."""
        self._num_attached += 1
        lineage = self._num_attached % self.num_lineages
        template = self.compiler.template(spec, lineage)
        if template is None:
            template = self.compiler.template(spec)
            if template is None:  # evicted from the bounded cache since it compiled: compiled again
                self.compiler.compile(spec)
                template = self.compiler.template(spec)
            if spec.key not in self._growing:
                self._growing.add(spec.key)
                grown = self._pool.submit(self.compiler.add_lineages, spec, self.num_lineages)
                grown.add_done_callback(lambda _: self._growing.discard(spec.key))
        return _Grammar(spec, lineage, template, template.deep_copy())

    def fill_bitmask(
        self, scheduler_output: SchedulerOutput, requests: dict[str, Request]
    ) -> MasksBesideForward | MasksOnDemand | None:
        """Name this step's constrained sampling rows in the SchedulerOutput and return their masks of allowed
        tokens as they will be filled (masks.py); None: no constrained row. The matchers must not move until
        the runner has the masks; they consume the step's tokens afterwards."""
        self._settle()
        no_sample = set(scheduler_output.no_sample_req_ids)
        rows = []
        for req_id in scheduler_output.num_scheduled_tokens:
            grammar = self._grammars.get(req_id)
            request = requests[req_id]
            if grammar is None or req_id in no_sample or request.num_computed_tokens < request.num_tokens:
                continue
            self._sync(grammar, request.output_token_ids)
            rows.append(req_id)
        if not rows:
            return None
        scheduler_output.grammar_req_ids = rows
        grammars = [self._grammars[req_id] for req_id in rows]
        checks = self.compiler.checks_tokens
        matchers = [MaskRow(g.matcher, i, id(g.template), checks(g.spec)) for i, g in enumerate(grammars)]
        if self.fill_mode == "auto":  # on demand: the greedy head's best ids spare most masks (masks.py)
            beside = self._free_cores and not (self._device_type == "cpu" and _plain_greedy(scheduler_output, requests))
        else:
            beside = self.fill_mode == "beside"
        if beside:
            self._filling = MasksBesideForward(self._filler, matchers)
        else:
            self._filling = MasksOnDemand(self._filler, matchers, self.compiler.special_tokens, self._free_cores)
        return self._filling

    def _settle(self) -> None:
        """Wait until no fill reads the matchers (the runner has normally waited for it already)."""
        if self._filling is not None:
            self._filling.settle()
            self._filling = None

    def advance(self, model_output: ModelRunnerOutput) -> set[str]:
        """Consume each constrained row's sampled token; the ids of requests whose output is now complete."""
        self._settle()
        complete = set()
        for req_id, token in zip(model_output.sampled_req_ids, model_output.sampled_token_ids):
            grammar = self._grammars.get(req_id)
            if grammar is None:
                continue
            grammar.num_consumed += 1
            if not grammar.matcher.consume_token(token):
                logger.warning(
                    "request %s: token %d is outside its grammar (%s); it stops here",
                    req_id,
                    token,
                    grammar.matcher.get_error(),
                )
                complete.add(req_id)
            elif grammar.matcher.is_stopped():
                complete.add(req_id)
        return complete

    def forget_finished(self, requests: dict[str, Request]) -> None:
        for req_id in [r for r in self._grammars if r not in requests]:
            del self._grammars[req_id]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._filler.shutdown()

    def _sync(self, grammar: _Grammar, outputs: list[int]) -> None:
        """Rebuild the matcher from its grammar and replay `outputs` when it has not seen exactly them, or when
        its own lineage is built now."""
        own = self.compiler.template(grammar.spec, grammar.lineage)
        if own is not None and own is not grammar.template:
            grammar.template = own
        elif grammar.num_consumed == len(outputs):
            return
        grammar.matcher = grammar.template.deep_copy()
        grammar.matcher.consume_tokens(outputs)
        grammar.num_consumed = len(outputs)


def _plain_greedy(so: SchedulerOutput, requests: dict[str, Request]) -> bool:
    """Whether every request that samples in this step takes the first maximum of its raw logits and wants no
    logprobs: then the runner's greedy head serves the step (as far as the engine core can tell)."""
    no_sample = set(so.no_sample_req_ids)
    for req_id in so.num_scheduled_tokens:
        request = requests[req_id]
        if req_id in no_sample or request.num_computed_tokens < request.num_tokens:
            continue
        p = request.sampling_params
        if not p.greedy or p.logprobs is not None or request.num_output_tokens < p.min_tokens:
            return False
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            return False
    return True
