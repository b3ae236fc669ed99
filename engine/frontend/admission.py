"""Admission limits of the front end: how many requests may wait for their first token, how many live
sessions may be open. Past a limit a new request or session is refused at once with EngineOverloadedError
(HTTP 429, gRPC RESOURCE_EXHAUSTED, a Realtime `server_overloaded` error) instead of queueing without bound.
"""

from __future__ import annotations

import threading


class EngineOverloadedError(RuntimeError):
    """The server is at one of its configured load limits; the client should retry later."""


class Admission:
    def __init__(self, max_queued_requests: int | None = None, max_live_sessions: int | None = None) -> None:
        for name, value in (("max_queued_requests", max_queued_requests), ("max_live_sessions", max_live_sessions)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.max_queued_requests = max_queued_requests
        self.max_live_sessions = max_live_sessions
        self.queued = 0  # requests admitted that have not produced their first output yet
        self.sessions = 0  # live sessions admitted and not closed
        self._lock = threading.Lock()  # requests arrive from every server's event loop

    def admit_request(self) -> None:
        with self._lock:
            if self.max_queued_requests is not None and self.queued >= self.max_queued_requests:
                raise EngineOverloadedError(
                    f"{self.queued} requests are already waiting for their first token, the limit of "
                    f"--max-queued-requests; retry later")
            self.queued += 1

    def request_started(self) -> None:
        """An admitted request produced its first output (or ended before it): it no longer waits."""
        with self._lock:
            self.queued -= 1

    def admit_session(self) -> None:
        with self._lock:
            if self.max_live_sessions is not None and self.sessions >= self.max_live_sessions:
                raise EngineOverloadedError(
                    f"{self.sessions} live sessions are open, the limit of --max-live-sessions; retry later")
            self.sessions += 1

    def session_closed(self) -> None:
        with self._lock:
            self.sessions -= 1
