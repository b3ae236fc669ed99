"""What the repetition, frequency and presence penalties read: per request, its output-token counts and the
set of its prompt tokens, kept on the device and counted there after each sampling.

Only requests that use a penalty hold a row, so the tables exist only while one is running. A row is dense
over the vocabulary ([V] int32 counts + [V] bool prompt mask: 750 KB at V = 152064): applying a penalty
then reads a row in one gather and counting a sampled token is one scatter-add, with no host work and no
shape that depends on the data. A sparse form (each request's distinct tokens) would make both steps
grow a variable-length list on the host every step. The tables grow by doubling and are freed when the
last penalized request leaves; 256 such requests at once hold 190 MB.
"""

from __future__ import annotations

import torch


class PenaltyCounts:
    """Dense [rows, V] output-token counts and prompt-token masks, one row per penalized request."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._free: list[int] = []
        self._num_used = 0
        self._empty()

    def claim(self, prompt_ids: list[int], output_ids: list[int]) -> int:
        """A row for a request, filled from its prompt and its outputs so far."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self._num_used += 1
        self.refill(row, prompt_ids, output_ids)
        return row

    def refill(self, row: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Reset a row to these prompt and output tokens (a request's turn boundary moved, or it resumed)."""
        prompt = torch.tensor(prompt_ids, dtype=torch.long).to(self.device)
        outputs = torch.tensor(output_ids, dtype=torch.long).to(self.device)
        self.prompt[row].zero_().index_fill_(0, prompt, True)
        self.counts[row].zero_().index_add_(0, outputs, torch.ones_like(outputs, dtype=torch.int32))

    def release(self, row: int) -> None:
        self._free.append(row)
        self._num_used -= 1
        if self._num_used == 0:
            self._empty()

    def add_sampled(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Count one sampled token per given row (device tensors [N]; rows distinct)."""
        ones = torch.ones_like(token_ids, dtype=torch.int32)
        self.counts.index_put_((rows, token_ids), ones, accumulate=True)

    def _empty(self) -> None:
        self.counts = torch.zeros(0, self.vocab_size, dtype=torch.int32, device=self.device)  # [rows, V]
        self.prompt = torch.zeros(0, self.vocab_size, dtype=torch.bool, device=self.device)  # [rows, V]
        self._free = []

    def _grow(self) -> None:
        old = self.counts.shape[0]
        size = max(4, 2 * old)
        counts = torch.zeros(size, self.vocab_size, dtype=torch.int32, device=self.device)
        prompt = torch.zeros(size, self.vocab_size, dtype=torch.bool, device=self.device)
        counts[:old] = self.counts
        prompt[:old] = self.prompt
        self.counts, self.prompt = counts, prompt
        self._free.extend(range(size - 1, old - 1, -1))
