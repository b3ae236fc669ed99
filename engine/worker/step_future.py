"""StepFuture: the output of a launched model step, read only when the caller needs it.

A step's results reach the host through copies enqueued right after its sampling (non-blocking, into pinned
memory on a GPU) and an event recorded behind them; `result()` waits for that event alone, never for the device
as a whole, so steps launched since keep running. On CPU every copy is done at launch and the future is complete.
It owns no device work of its own: the runner enqueues the copies, the future only waits and converts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from omnistream.scheduler.outputs import ModelRunnerOutput


def to_pinned_host(tensor: torch.Tensor) -> torch.Tensor:
    """Enqueue a copy of a device tensor into pinned host memory (the tensor itself on CPU)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class StepFuture:
    """`finish` builds the ModelRunnerOutput from host copies; it runs once, after `event` (if any) completes."""

    def __init__(self, finish: Callable[[], ModelRunnerOutput], event: torch.cuda.Event | None = None) -> None:
        self._finish = finish
        self._event = event
        self._output: ModelRunnerOutput | None = None

    @classmethod
    def done(cls, output: ModelRunnerOutput) -> StepFuture:
        """A future that is already complete."""
        future = cls(lambda: output)
        future.result()
        return future

    @classmethod
    def after_copies(cls, device: torch.device, finish: Callable[[], ModelRunnerOutput]) -> StepFuture:
        """A future for copies just enqueued on `device`'s current stream (complete at once on CPU)."""
        if device.type != "cuda":
            return cls.done(finish())
        event = torch.cuda.Event()
        event.record()
        return cls(finish, event)

    def result(self) -> ModelRunnerOutput:
        """The step's output; waits for its copies (not for later work on the device)."""
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            self._output = self._finish()
        return self._output
