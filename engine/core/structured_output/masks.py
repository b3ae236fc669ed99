"""One step's masks of allowed tokens as the runner receives them (token_bitmask.PendingMasks), filled by
llguidance (without the GIL) on the filler's threads and the runner's, one of two ways (`mask_threads`):

- MasksBesideForward: the filler's threads start before the forward, so the forward runs meanwhile and the
  compiled greedy head takes every row's mask when it starts; used where cores are free during the forward
  (every core beside a GPU; on a CPU, those that torch's threads leave). When the runner asks, its thread fills
  the rows no thread has taken yet (the forward was faster).
- MasksOnDemand: filled when the runner asks, after the forward, and only for the rows that need one. The
  runner's greedy head gives each row its best few ids in order (greedy_kernel.greedy_top); the first of them
  that the row's grammar allows is the row's masked greedy token (`first_allowed`), and only a row where none is
  known to be allowed gets a mask (`fill_rows`). A grammar check of one token is about 1.5 us, a mask over the
  vocabulary 60 us (a forced token, a structural JSON position) to 0.7 ms (inside a string). Used on a CPU for a
  step whose every sampling row is plain greedy (the manager's choice), and where no core is free (torch's OpenMP
  threads slow down many times over when they share a core). The rows the check cannot settle whatever the head
  picks (most of them in a forced state, 42% of the rows of the benchmark's JSON workload) are filled beside the
  forward where a core is free.

`first_allowed` answers only where llguidance's mask is certain to agree with its per-token check
(`validate_tokens`): not in a state with forced bytes (the mask then allows just the first token llguidance
tokenizes them into, where the check accepts any prefix), not for special tokens (end of sequence, which the mask
allows when the grammar accepts and the check refuses, and the vocabulary's padding), not for a stopped matcher,
and only for grammars of JSON schemas, regular expressions and choices (a Lark grammar may name special tokens or
token ranges). Elsewhere it answers -1 and the mask decides: the outcome is the masked maximum either way.

Matchers copied from one compiled template share llguidance's lock, so a thread fills the rows of one lineage
(template) at a time, a lineage no other thread holds (RowQueue): threads never wait on each other's lock.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import NamedTuple

import llguidance
import llguidance.numpy
import numpy as np
import torch

MAX_MASK_THREADS = 8  # threads filling the rows' masks, at most


class MaskRow(NamedTuple):
    matcher: llguidance.LLMatcher
    row: int  # its row in the mask array
    lineage: int  # the id of the template it was copied from: matchers of one lineage share a lock
    checkable: bool = False  # its grammar's masks agree with per-token checks (first_allowed)


def checks_answer(row: MaskRow) -> bool:
    """Whether per-token checks may stand for the row's mask in its matcher's state (the module's docstring)."""
    return row.checkable and not row.matcher.is_stopped() and not row.matcher.compute_ff_bytes()


def first_allowed(row: MaskRow, candidates: list[int], special: np.ndarray) -> int:
    """The first of `candidates` that the row's mask allows, where per-token checks are certain to agree with the
    mask (the module's docstring), checked in order; -1 where none is or where the mask must decide.
    special: bool [V], the tokens llguidance treats as special (end of sequence included)."""
    if not checks_answer(row):
        return -1
    matcher = row.matcher
    for token in candidates:
        if not 0 <= token < len(special) or special[token]:
            return -1
        if matcher.validate_tokens([token]) == 1:
            return token
    return -1


def mask_threads(device_type: str) -> tuple[int, bool]:
    """(threads filling masks, whether they fill beside the forward) for a model on `device_type`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = cores if device_type != "cpu" else cores - torch.get_num_threads()
    if free >= 1:
        return min(free, MAX_MASK_THREADS), True
    return min(cores, MAX_MASK_THREADS), False


class RowQueue:
    """The rows left to fill, by lineage; each thread that fills holds one lineage at a time."""

    def __init__(self, rows: list[MaskRow]) -> None:
        self._left: dict[int, list[MaskRow]] = {}
        for row in reversed(rows):  # popped from the end: in row order
            self._left.setdefault(row.lineage, []).append(row)
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def fill(self, bitmask: np.ndarray) -> None:
        """Fill rows into `bitmask` until every row left belongs to a lineage another thread holds."""
        while (row := self._take()) is not None:
            try:
                llguidance.numpy.fill_next_token_bitmask(row.matcher, bitmask, row.row)
            finally:
                with self._lock:
                    self._held.discard(row.lineage)

    def _take(self) -> MaskRow | None:
        """The next row of the free lineage with the most rows left (so lineages drain evenly), held."""
        with self._lock:
            free = [lineage for lineage, rows in self._left.items() if rows and lineage not in self._held]
            if not free:
                return None
            lineage = max(free, key=lambda k: len(self._left[k]))
            self._held.add(lineage)
            return self._left[lineage].pop()


class MaskFiller:
    """Fills masks into [R, W] int32 arrays on `threads` threads of its own and the caller's."""

    def __init__(self, vocab_size: int, threads: int) -> None:
        self.vocab_size = vocab_size
        self.threads = threads
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, "grammar-mask")

    def allocate(self, num_rows: int) -> np.ndarray:
        """[num_rows, W] int32, every token allowed."""
        return llguidance.numpy.allocate_token_bitmask(num_rows, self.vocab_size)

    def start(self, rows: RowQueue, bitmask: np.ndarray, threads: int) -> list[concurrent.futures.Future]:
        """`threads` of the filler's threads fill rows into bitmask (until none is left to take)."""
        return [self.pool.submit(rows.fill, bitmask) for _ in range(threads)]

    def fill(self, rows: list[MaskRow], num_rows: int) -> np.ndarray:
        """A fresh [num_rows, W] array with the masks of `rows`, filled by the caller and the filler's threads."""
        bitmask = self.allocate(num_rows)
        self.fill_into(rows, bitmask)
        return bitmask

    def fill_into(self, rows: list[MaskRow], bitmask: np.ndarray) -> None:
        """The masks of `rows` into their rows of bitmask, filled by the caller and the filler's threads."""
        if not rows:
            return
        queue = RowQueue(rows)
        futures = self.start(queue, bitmask, min(self.threads, len(rows)) - 1)
        queue.fill(bitmask)
        _finish(futures)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _finish(futures: list[concurrent.futures.Future]) -> None:
    """Wait for the fills that started (the rows they hold); those not started are dropped: nothing is left."""
    for future in futures:
        if not future.cancel():
            future.result()


class MasksBesideForward:
    beside_forward = True

    def __init__(self, filler: MaskFiller, rows: list[MaskRow]) -> None:
        self._bitmask = filler.allocate(len(rows))
        self._rows = RowQueue(rows)
        self._futures = filler.start(self._rows, self._bitmask, filler.threads)

    def result(self, chosen: list[int] | None = None) -> np.ndarray:
        """Every row's mask (`chosen` is not needed: they are all filled); fills the rows not taken yet."""
        self._rows.fill(self._bitmask)
        _finish(self._futures)
        return self._bitmask

    def settle(self) -> None:
        """Return once no thread reads the matchers."""
        _finish(self._futures)


class MasksOnDemand:
    """Masks for the rows that need one, filled into one [R, W] array (every token allowed in the other rows).
    The rows whose check cannot answer (`checks_answer`: forced bytes, a Lark grammar, a stopped matcher) need
    theirs whatever the greedy head picks: where a core is free (`early`), a filler's thread finds and fills them
    while the forward runs; the checks and the other masks wait until it is done, so that no two threads read
    one matcher."""

    beside_forward = False

    def __init__(self, filler: MaskFiller, rows: list[MaskRow], special: np.ndarray, early: bool = False) -> None:
        self._filler = filler
        self._rows = [row._replace(row=i) for i, row in enumerate(rows)]
        self._special = special
        self._bitmask = filler.allocate(len(rows))
        self._early: set[int] = set()  # rows filled by _prepare
        self._filled: set[int] = set()  # rows filled by fill_rows
        self._prepared = filler.pool.submit(self._prepare) if early else None

    def result(self, chosen: list[int] | None = None) -> np.ndarray:
        """The rows' masks; given each row's greedy token, only the rows whose grammar is not known to allow it get
        one (the others allow every token, so they keep theirs)."""
        self._wait_prepared()
        todo = [row for row in self._rows if row.row not in self._early]
        if chosen is not None:
            special = self._special
            todo = [row for row in todo if first_allowed(row, [chosen[row.row]], special) != chosen[row.row]]
        self._filler.fill_into(todo, self._bitmask)
        return self._bitmask

    def prepared(self) -> list[int]:
        """The rows whose masks are filled already: those whose check cannot answer (waits for them)."""
        self._wait_prepared()
        return sorted(self._early)

    def first_allowed(self, rows: list[int], candidates: list[list[int]]) -> list[int]:
        """For the rows at these positions, the first of each one's candidate ids (best first) that its grammar
        allows, or -1 where none is known to be: then fill_rows gives its mask."""
        self._wait_prepared()
        early, special = self._early, self._special
        return [-1 if i in early else first_allowed(self._rows[i], ids, special) for i, ids in zip(rows, candidates)]

    def fill_rows(self, rows: list[int]) -> np.ndarray:
        """[len(rows), W] int32: the masks of the rows at these positions, in this order (each filled once)."""
        self._wait_prepared()
        todo = [i for i in dict.fromkeys(rows) if i not in self._early and i not in self._filled]
        self._filler.fill_into([self._rows[i] for i in todo], self._bitmask)
        self._filled.update(todo)
        return self._bitmask[rows]

    def settle(self) -> None:
        """Return once no thread reads the matchers."""
        if self._prepared is not None:
            self._prepared.result()

    def _prepare(self) -> None:
        """Find the rows whose check cannot answer and fill their masks."""
        self._early = {row.row for row in self._rows if not checks_answer(row)}
        self._filler.fill_into([row for row in self._rows if row.row in self._early], self._bitmask)

    def _wait_prepared(self) -> None:
        """The early rows found and filled (here, where no filler's thread started on them)."""
        if self._prepared is None:
            self._prepare()
            self._prepared = concurrent.futures.Future()
            self._prepared.set_result(None)
        self._prepared.result()
