"""One step's masks of allowed tokens as the runner receives them (token_bitmask.PendingMasks), filled by
llguidance in parallel (without the GIL) in one of two ways, chosen once by `mask_threads`:

- MasksBesideForward: on a worker thread, started before the forward, so the forward runs meanwhile and the
  compiled greedy head takes every row's mask when it starts; used where cores are free during the forward
  (every core beside a GPU; on a CPU, those that torch's threads leave). Rows the worker has not taken when the
  runner asks (the forward was faster) are filled by the runner's thread beside it.
- MasksOnDemand: where no core is free (torch's OpenMP threads slow down many times over when they share a
  core), filled when the runner asks, after the forward. Given the greedy tokens of the rows, only the rows
  whose grammar rejects theirs get a mask (the others allow every token, so they keep theirs): a grammar check
  of one token is microseconds, a mask over the vocabulary far more.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import llguidance
import llguidance.numpy
import numpy as np
import torch

MAX_MASK_THREADS = 8  # llguidance threads filling the rows' masks, at most
Matchers = list[tuple[llguidance.LLMatcher, int]]  # (matcher, its row in the mask array)


def mask_threads(device_type: str) -> tuple[int, bool]:
    """(llguidance threads, whether they fill beside the forward) for a model on `device_type`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = cores if device_type != "cpu" else cores - torch.get_num_threads()
    if free >= 1:
        return min(free, MAX_MASK_THREADS), True
    return min(cores, MAX_MASK_THREADS), False


class MaskFiller:
    """Fills masks into a fresh [R, W] int32 array; rows no matcher writes allow every token."""

    def __init__(self, vocab_size: int, threads: int) -> None:
        self.vocab_size = vocab_size
        self.threads = threads
        self._executor: llguidance.LLExecutor | None = None

    def allocate(self, num_rows: int) -> np.ndarray:
        """[num_rows, W] int32, every token allowed."""
        return llguidance.numpy.allocate_token_bitmask(num_rows, self.vocab_size)

    def fill_into(self, matchers: Matchers, bitmask: np.ndarray, parallel: bool = True) -> None:
        """Each matcher's mask into its row of bitmask: on the filler's threads, or (parallel False) on the
        calling thread, beside any fill running on those threads (llguidance drops the GIL either way)."""
        if not parallel:
            for matcher, row in matchers:
                llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, row)
            return
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=self.threads)
        if matchers:
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, matchers, bitmask)

    def fill(self, matchers: Matchers, num_rows: int) -> np.ndarray:
        bitmask = self.allocate(num_rows)
        self.fill_into(matchers, bitmask)
        return bitmask


class MasksBesideForward:
    """The worker thread takes the rows in chunks (one row per filler thread); when the runner asks before every
    row is taken (the forward ended first), it fills the rows left itself, beside the worker."""

    beside_forward = True

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor, filler: MaskFiller, matchers: Matchers) -> None:
        self._filler = filler
        self._bitmask = filler.allocate(len(matchers))
        self._left = matchers[::-1]  # taken from the end: in row order
        self._lock = threading.Lock()
        self._future = pool.submit(self._fill_left, filler.threads, True)

    def _fill_left(self, chunk: int, parallel: bool) -> None:
        while True:
            with self._lock:
                taken = self._left[-chunk:][::-1]
                del self._left[-chunk:]
            if not taken:
                return
            self._filler.fill_into(taken, self._bitmask, parallel)

    def result(self, chosen: list[int] | None = None) -> np.ndarray:
        """Every row's mask (`chosen` is not needed: they are all filled); fills the rows not taken yet."""
        self._fill_left(1, False)
        if not self._future.cancel():  # the worker started: wait for the rows it has taken
            self._future.result()
        return self._bitmask

    def settle(self) -> None:
        """Return once the worker thread no longer reads the matchers."""
        concurrent.futures.wait([self._future])


class MasksOnDemand:
    beside_forward = False

    def __init__(self, filler: MaskFiller, matchers: Matchers) -> None:
        self._filler = filler
        self._matchers = matchers

    def result(self, chosen: list[int] | None = None) -> np.ndarray:
        """The rows' masks; given each row's greedy token, only the rows whose grammar rejects it get one."""
        todo = self._matchers
        if chosen is not None:
            todo = [(m, i) for (m, i), token in zip(self._matchers, chosen) if m.validate_tokens([token]) != 1]
        return self._filler.fill(todo, len(self._matchers))

    def settle(self) -> None:
        """Nothing runs in the background."""
