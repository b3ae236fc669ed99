"""The thinker rows the talker's prompts read, kept per speaking request or live session on the device.

A talker prompt holds every user turn of the conversation, and at a media placeholder the row
hidden_projection(h) of the thinker's hidden state h there. Each spoken turn of a session prefills its talker
prompt from the start (the turn's talker KV is freed when its speech ends), so every media row of a user turn
still in the session's context can be read again by a later turn: such a row is held until its position leaves
the context (a rollback: a cleared segment, a truncated answer and the input after it) or the request or session
is released. A row is projected as soon as the thinker computes h, so it costs the talker's width, not the
thinker's (real model: 1024 instead of 2048 values), and a session holds at most one row per media position of
its context, which max_model_len bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class TalkerRows:
    """Per request: the thinker positions whose rows are wanted and not kept yet, and the rows kept, in chunks
    as the thinker's forwards produced them. A row is a function of the tokens before it, so a kept row stays
    right until a rollback cuts below it: a recomputed prefill (a preemption) does not capture it again."""

    def __init__(self) -> None:
        self.wanted: dict[str, set[int]] = {}  # no empty sets: a request is here only while it waits for rows
        self._chunks: dict[str, list[tuple[list[int], torch.Tensor]]] = {}  # (positions, rows [n, H])

    def want(self, req_id: str, positions: list[int]) -> None:
        self.wanted.setdefault(req_id, set()).update(positions)

    def add(self, req_id: str, positions: list[int], rows: torch.Tensor) -> None:
        """Keep rows [n, H] at positions (wanted ones): they are wanted no more."""
        self._chunks.setdefault(req_id, []).append((positions, rows))
        self._unwant(req_id, set(positions).__contains__)

    def gather(self, req_id: str, positions: list[int]) -> torch.Tensor:
        """The rows at positions, in order [len(positions), H]."""
        where = {p: (chunk, i) for chunk, (held, _) in enumerate(self._chunks[req_id]) for i, p in enumerate(held)}
        chunks = self._chunks[req_id]
        return torch.stack([chunks[chunk][1][i] for chunk, i in (where[p] for p in positions)])

    def release(self, req_id: str) -> None:
        """The request or session is over: nothing reads its rows again."""
        self.wanted.pop(req_id, None)
        self._chunks.pop(req_id, None)

    def roll_back(self, req_id: str, num_tokens: int) -> None:
        """A session dropped every position from num_tokens on: their rows are never read again."""
        self._unwant(req_id, num_tokens.__le__)
        self._discard(req_id, num_tokens.__le__)

    def num_rows(self, req_id: str) -> int:
        return sum(len(positions) for positions, _ in self._chunks.get(req_id, ()))

    def nbytes(self, req_id: str) -> int:
        return sum(rows.nbytes for _, rows in self._chunks.get(req_id, ()))

    def _unwant(self, req_id: str, dropped: Callable[[int], bool]) -> None:
        wanted = {p for p in self.wanted.get(req_id, ()) if not dropped(p)}
        if wanted:
            self.wanted[req_id] = wanted
        else:
            self.wanted.pop(req_id, None)

    def _discard(self, req_id: str, dropped: Callable[[int], bool]) -> None:
        """Drop the rows at positions for which dropped(position); a chunk partly dropped keeps a copy of the
        rest, so the memory of the dropped rows is freed."""
        chunks = []
        for positions, rows in self._chunks.get(req_id, ()):
            keep = [i for i, p in enumerate(positions) if not dropped(p)]
            if len(keep) == len(positions):
                chunks.append((positions, rows))
            elif keep:
                index = torch.tensor(keep, dtype=torch.long, device=rows.device)
                chunks.append(([positions[i] for i in keep], rows.index_select(0, index)))
        if req_id in self._chunks:
            self._chunks[req_id] = chunks
