"""How the engine core turns the crank: one step at a time (SyncSteps) or overlapped with the device (OverlappedSteps).

A step is: release compiled grammars, schedule, fill the grammar bitmask, launch on the executor, then settle it:
read the sampled ids, advance the grammars, `update_from_output`. SyncSteps settles each step before it schedules
the next. OverlappedSteps (docs/hot-path.md §8) schedules and launches step N+1 while step N runs and only then
settles N: the scheduler counts N's tokens as placeholders, the runner reads them from the device (last_sampled),
so stops are seen one step late (the extra token is dropped) and results for requests aborted, preempted or whose
turn ended meanwhile arrive stale and are discarded (the scheduler's generation check).

Some steps need the previous one settled before they can be planned, and are settled at once (the loop is
synchronous around them): a step with grammar rows (the next bitmask needs the matcher advanced by its token), a
step that computes prompt logprobs (they are placed by the request's computed count at settle time) and a step with
talker steps (the speech lane plans its next frame from this one's codes).
Owns only the order of these calls; the scheduler decides, the executor computes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from omnistream.engine.core.structured_output.manager import StructuredOutputManager
from omnistream.engine.worker.executor import Executor
from omnistream.engine.worker.step_future import StepFuture
from omnistream.engine.worker.token_bitmask import PendingMasks
from omnistream.scheduler.outputs import EngineCoreOutput, SchedulerOutput
from omnistream.scheduler.request import RequestStatus
from omnistream.scheduler.scheduler import Scheduler

GRAMMAR_WAIT_S = 0.005  # an idle step waits this long for a grammar being compiled


class Steps(ABC):
    def __init__(self, scheduler: Scheduler, executor: Executor, grammars: StructuredOutputManager) -> None:
        self.scheduler, self.executor, self.grammars = scheduler, executor, grammars

    @property
    def in_flight(self) -> bool:
        """A launched step is not settled yet."""
        return False

    @abstractmethod
    def step(self) -> list[EngineCoreOutput]:
        """Run the loop one turn; the outputs of the steps settled in it."""

    def _schedule(self) -> tuple[list[EngineCoreOutput], SchedulerOutput, PendingMasks | None]:
        """Plan the next step; also returns the requests whose grammar failed to compile (aborted) and the step's
        grammar masks when they are being filled beside the forward."""
        requests, grammars = self.scheduler.requests, self.grammars
        failed = grammars.release_compiled(requests)
        self._abort_failed(failed)
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty and grammars.compiling and not failed and not self.in_flight:
            failed = grammars.release_compiled(requests, wait_s=GRAMMAR_WAIT_S)  # nothing else to do: wait
            self._abort_failed(failed)
        masks = grammars.fill_bitmask(scheduler_output, requests)
        return failed, scheduler_output, masks

    def _abort_failed(self, failed: list[EngineCoreOutput]) -> None:
        request_ids = [output.req_id for output in failed]
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        for req_id in request_ids:
            self.grammars.forget(req_id)

    def _settle(self, scheduler_output: SchedulerOutput, future: StepFuture) -> list[EngineCoreOutput]:
        model_output = future.result()
        complete = self.grammars.advance(model_output)
        outputs = self.scheduler.update_from_output(scheduler_output, model_output, complete)
        self.grammars.forget_finished(self.scheduler.requests)
        return outputs


class SyncSteps(Steps):
    """Schedule, launch and settle each step before the next."""

    def step(self) -> list[EngineCoreOutput]:
        failed, scheduler_output, masks = self._schedule()
        future = self.executor.launch(scheduler_output, masks)  # in process, or on every TP rank
        return failed + self._settle(scheduler_output, future)


class OverlappedSteps(Steps):
    """Launch step N+1, then settle step N: the host plans while the device computes."""

    def __init__(self, scheduler: Scheduler, executor: Executor, grammars: StructuredOutputManager) -> None:
        super().__init__(scheduler, executor, grammars)
        self._pending: tuple[SchedulerOutput, StepFuture] | None = None

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    def step(self) -> list[EngineCoreOutput]:
        failed, scheduler_output, masks = self._schedule()
        at_once = scheduler_output.is_empty or self._settles_at_once(scheduler_output)
        future = self.executor.launch(scheduler_output, masks)  # in process, or on every TP rank
        outputs = failed
        if self._pending is not None:
            outputs += self._settle(*self._pending)
        self._pending = None if at_once else (scheduler_output, future)
        if at_once:
            outputs += self._settle(scheduler_output, future)
        return outputs

    def _settles_at_once(self, scheduler_output: SchedulerOutput) -> bool:
        """A step with grammar rows or talker steps, or one that computes prompt logprobs, is settled before the next
        is planned (called right after it is scheduled: its first positions are the computed counts less its tokens)."""
        if scheduler_output.grammar_req_ids or scheduler_output.speech is not None:
            return True
        requests = self.scheduler.requests
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = requests[req_id]
            first = request.num_computed_tokens - num_tokens  # this step's first position
            if request.sampling_params.prompt_logprobs is not None and first < request.num_prompt_tokens - 1:
                return True
        return False


def make_steps(overlap: bool, scheduler: Scheduler, executor: Executor, grammars: StructuredOutputManager) -> Steps:
    return (OverlappedSteps if overlap else SyncSteps)(scheduler, executor, grammars)
