"""Scheduling policies: the order in which running and waiting requests get this step's token budget.

Every policy puts decodes first (one token each, latency-critical), then live input that lags real
time (the oldest pending input first), then the rest; policies differ in how they order the rest
and the waiting queue. Preemption victims: idle open sessions first, then the newest request.
"""

from __future__ import annotations

from collections.abc import Iterable

from omnistream.scheduler.request import Request


def _is_live_input(request: Request) -> bool:
    return request.accepting_input and request.pending_since is not None


class FcfsPolicy:
    """First come, first served among ordinary prefills."""

    name = "fcfs"

    def rest_key(self, request: Request) -> tuple:
        return (request.arrival_time,)

    def running_order(self, running: Iterable[Request]) -> list[Request]:
        decodes, live, rest = [], [], []
        for request in running:  # a decode: one token to compute, no input being appended (inline: hot)
            if (not request.accepting_input
                    and len(request.all_token_ids) + request.num_placeholders - request.num_computed_tokens == 1):
                decodes.append(request)
            else:
                (live if _is_live_input(request) else rest).append(request)
        live.sort(key=lambda r: r.pending_since)
        rest.sort(key=self.rest_key)
        return decodes + live + rest

    def waiting_order(self, waiting: Iterable[Request]) -> list[Request]:
        """Preempted requests keep their place at the front; live input before ordinary prompts."""
        return sorted(waiting, key=lambda r: (not _is_live_input(r), *self.rest_key(r)))


class PriorityPolicy(FcfsPolicy):
    """Lower `priority` value first (as in vLLM), then arrival."""

    name = "priority"

    def rest_key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)


class DeadlinePolicy(FcfsPolicy):
    """Earliest deadline first; a request's deadline is arrival + priority seconds (0: as soon as possible)."""

    name = "deadline"

    def rest_key(self, request: Request) -> tuple:
        return (request.arrival_time + max(request.priority, 0), request.arrival_time)


POLICIES = {p.name: p for p in (FcfsPolicy, PriorityPolicy, DeadlinePolicy)}


def make_policy(name: str) -> FcfsPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {sorted(POLICIES)}")
    return POLICIES[name]()


def preemption_victim(running: list[Request]) -> Request:
    """Idle open sessions (nothing to compute, not generating) lose their KV first, newest first;
    otherwise the newest running request."""
    for request in reversed(running):
        if request.accepting_input and not request.has_work:
            return request
    return running[-1]
