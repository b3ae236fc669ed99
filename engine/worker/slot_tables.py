"""The persistent batch: per-request slots (0 .. max_num_seqs - 1) and the tables indexed by them, allocated once.

A request claims a slot when the runner first hears of it and frees it when it finishes or is preempted. Its page
ids sit in a row of `block_table` (unused entries hold the sink page, which no request owns) and its computed-token
count in `num_computed`. New pages are staged while a SchedulerOutput is read and applied with one scatter per step;
the table is never rebuilt. On CPU the device table is the host table itself; on a GPU the scatter is repeated there
from one upload of the staged (row, column, page) triples.

`last_sampled` holds, on the device, the token each slot sampled last (written by the sampling step). A decode row
whose token the host does not know yet (overlapped scheduling: the step that sampled it is still in flight) takes
its input id from there with a gather, so a step can be prepared before the previous one's ids reach the host.
"""

from __future__ import annotations

import numpy as np
import torch


class SlotTables:
    def __init__(self, num_slots: int, max_pages: int, sink_page: int, device: torch.device) -> None:
        self.sink_page, self.device = sink_page, device
        self.block_table = np.full((num_slots, max_pages), sink_page, dtype=np.int32)
        host = torch.from_numpy(self.block_table)
        self.device_table = host if device.type == "cpu" else host.to(device)
        self.num_pages = np.zeros(num_slots, dtype=np.int64)
        self.num_computed = np.zeros(num_slots, dtype=np.int64)
        self.last_sampled = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self._staged: list[tuple[int, int, list[int]]] = []  # (slot, first column, page ids)

    def claim(self, num_computed: int) -> int:
        if not self._free:
            raise RuntimeError(f"the runner holds {self.block_table.shape[0]} requests already (max_num_seqs)")
        slot = self._free.pop()
        self.num_computed[slot] = num_computed
        return slot

    def release(self, slot: int) -> None:
        self.block_table[slot, : self.num_pages[slot]] = self.sink_page
        if self.device.type != "cpu":
            self.device_table[slot, : int(self.num_pages[slot])] = self.sink_page
        self.num_pages[slot] = 0
        self._free.append(slot)

    def add_pages(self, slot: int, page_ids: list[int]) -> None:
        """Stage page ids to append to the slot's row (applied by apply_staged)."""
        if not page_ids:
            return
        first = int(self.num_pages[slot])
        if first + len(page_ids) > self.block_table.shape[1]:
            raise RuntimeError(f"a request needs {first + len(page_ids)} KV pages, more than the "
                               f"{self.block_table.shape[1]} a runner row holds (max_model_len / block_size)")
        self._staged.append((slot, first, page_ids))
        self.num_pages[slot] = first + len(page_ids)

    def apply_staged(self) -> None:
        """Write every staged page id with one scatter (and one upload and scatter on a GPU)."""
        if not self._staged:
            return
        counts = np.array([len(ids) for _, _, ids in self._staged])
        rows = np.repeat(np.array([slot for slot, _, _ in self._staged]), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        cols = np.repeat(np.array([first for _, first, _ in self._staged]), counts) + offsets
        ids = np.fromiter((page for _, _, pages in self._staged for page in pages), dtype=np.int32, count=len(rows))
        self.block_table[rows, cols] = ids
        if self.device.type != "cpu":
            staged = torch.from_numpy(np.stack([rows, cols, ids])).to(self.device, non_blocking=True)
            self.device_table[staged[0], staged[1]] = staged[2].int()
        self._staged.clear()

    def rows(self, slots: np.ndarray, width: int) -> torch.Tensor:
        """The first `width` columns of the slots' rows [len(slots), width] int32, on the device."""
        if self.device.type == "cpu":
            return torch.from_numpy(self.block_table[slots, :width])
        index = torch.from_numpy(slots).to(self.device, non_blocking=True)
        return self.device_table[index, :width]

    def record_sampled(self, slots: list[int], token_ids: torch.Tensor) -> None:
        """Keep the tokens just sampled [len(slots)] (on the device) as the slots' last_sampled."""
        index = torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(self.device, non_blocking=True)
        self.last_sampled.index_copy_(0, index, token_ids)

    def input_ids(self, token_ids: np.ndarray, pending_rows: list[int], pending_slots: list[int]) -> torch.Tensor:
        """A step's input ids on the device: the known ones uploaded (int64 [T]), with the flat rows in
        `pending_rows` taken from their slots' last_sampled (tokens sampled by a step the host has not read)."""
        ids = torch.from_numpy(token_ids).to(self.device, non_blocking=True)
        if pending_rows:
            where = torch.from_numpy(np.array([pending_rows, pending_slots], dtype=np.int64))
            where = where.to(self.device, non_blocking=True)
            ids.index_copy_(0, where[0], self.last_sampled.index_select(0, where[1]))
        return ids
