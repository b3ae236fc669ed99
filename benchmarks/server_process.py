"""A benchmark's server in a child process: its own process group on a free loopback port, ready when
GET /health answers 200, and stopped as a whole group (SIGTERM, then SIGKILL after a grace period) so
that no engine-core or worker process outlives it, whatever ends the benchmark (error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`argv` run with its output in `log_path`; use as a context manager around the measurements."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 600.0, stop_timeout_s: float = 30.0) -> None:
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, start_new_session=True)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self) -> None:
        """Block until /health is 200; RuntimeError (with the log's tail) if the server dies or times out."""
        assert self.process is not None
        start = time.monotonic()
        with httpx.Client(timeout=5) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with status {self.process.returncode} before it was "
                                       f"ready; the end of {self.log_path}:\n{self.log_tail()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        self.startup_s = time.monotonic() - start
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() - start > self.ready_timeout_s:
                    raise RuntimeError(f"{self.name} was not ready after {self.ready_timeout_s:.0f} s; the end of "
                                       f"{self.log_path}:\n{self.log_tail()}")
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL to whatever is left after the grace period; idempotent."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the group id is the leader's pid
        self._signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        try:
            self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            pass
        while self._group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._group_alive(group):
            self._signal_group(group, signal.SIGKILL)
        self.process.wait()
        self.process = None

    @staticmethod
    def _signal_group(group: int, sig: signal.Signals) -> None:
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _group_alive(group: int) -> bool:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
