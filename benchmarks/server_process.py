"""A benchmark's server in a child process: its own process group on a free loopback port, ready when
GET /health answers 200, and stopped with every process it started (SIGTERM to its group, then SIGKILL
after a grace period to the group and to any descendant that left it, as omnistream's engine core does
with a session of its own), so that nothing outlives it, whatever ends the benchmark (error, Ctrl-C,
SIGTERM). Descendants are found through /proc (Linux); elsewhere the group alone is stopped.
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
        self.extra_env = dict(env or {})
        self.env = {**os.environ, **self.extra_env}
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
        """SIGTERM to the group, SIGKILL to whatever of it and its descendants is left after the grace
        period; idempotent. Ctrl-C and SIGTERM are held until it is done (then they act as usual)."""
        if self.process is None:
            return
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # a 2nd Ctrl-C waits
        try:
            self._stop_processes(self.process)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.process = None

    def _stop_processes(self, process: subprocess.Popen[bytes]) -> None:
        group = process.pid  # start_new_session: the group id is the leader's pid
        descendants = _descendants(group)
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            pass
        while (_group_alive(group) or _any_alive(descendants)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
        for pid, start in descendants.items():
            if _start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        process.wait()


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 onwards), None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # field 22: start time, tells a pid from its reuse


def _descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every live descendant of `root` ({} without /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = list(parents.get(root, []))
    while stack:
        pid = stack.pop()
        start = _start_time(pid)
        if start is not None and pid not in found:
            found[pid] = start
            stack.extend(parents.get(pid, []))
    return found


def _any_alive(processes: dict[int, str]) -> bool:
    return any(_start_time(pid) == start for pid, start in processes.items())


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    """Whether a live (not zombie) process is still in the group."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    return any((fields := _stat_fields(int(e.name))) is not None and fields[2] == str(group)
               for e in Path("/proc").glob("[0-9]*"))
