"""Core clients: how AsyncLLM reaches its engine core — in its own process over ZMQ, or in a thread.

Both take the commands of engine/core/messages.py: `send` (fire and forget) and `call` (a Future of the
reply), and report from their own thread through two callbacks: `on_outputs(list[EngineCoreOutput])` after
each step and `on_dead(EngineDeadError)` once, if the core stops. MPCoreClient is the serving transport
(msgspec over `ipc://` sockets in a private 0700 directory; a dead core is noticed at once, through a pipe
only it holds open); InprocCoreClient applies the same commands in a thread of this process (for debugging and
for tests that look inside the engine).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable

import msgspec
import zmq

from omnistream.engine.core.engine_core import EngineCore
from omnistream.engine.core.messages import (
    Batch,
    Call,
    Command,
    Died,
    Event,
    Outputs,
    Ready,
    Reply,
    Shutdown,
    StartupFailed,
)
from omnistream.engine.core.service import CoreService
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.errors import EngineDeadError
from omnistream.scheduler.outputs import EngineCoreOutput

logger = logging.getLogger(__name__)

OutputsCallback = Callable[[list[EngineCoreOutput]], None]
DeadCallback = Callable[[EngineDeadError], None]

_IDLE_WAIT_S = 0.05  # how long the in-process engine thread sleeps when there is nothing to compute
_POLL_MS = 200
_SHUTDOWN_JOIN_S = 30


class CoreClient(ABC):
    ready: Ready

    def __init__(self, on_outputs: OutputsCallback, on_dead: DeadCallback) -> None:
        self._on_outputs = on_outputs
        self._on_dead = on_dead
        self.dead: EngineDeadError | None = None

    @abstractmethod
    def send(self, command: Command | Batch) -> None:
        """Apply `command` between steps; nobody waits for it (failures are logged by the core)."""

    @abstractmethod
    def call(self, command: Command | Batch) -> concurrent.futures.Future:
        """Apply `command` between steps; the Future holds its value or its exception."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the core and free what it holds; safe to call twice."""

    def _die(self, error: EngineDeadError, take_pending: Callable[[], list[concurrent.futures.Future]]) -> None:
        """Mark the core dead first (new commands fail from now on), then fail what was waiting."""
        if self.dead is not None:
            return
        self.dead = error
        for future in take_pending():
            if not future.done():
                future.set_exception(error)
        self._on_dead(error)


class InprocCoreClient(CoreClient):
    """The engine core in a thread of this process; `engine` is reachable for inspection."""

    def __init__(self, config: EngineConfig, on_outputs: OutputsCallback, on_dead: DeadCallback) -> None:
        super().__init__(on_outputs, on_dead)
        self.service = CoreService(EngineCore(config))
        self.engine = self.service.engine
        self.ready = self.service.ready()
        self._commands: collections.deque[tuple[Command | Batch, concurrent.futures.Future | None]] = \
            collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="omnistream-engine", daemon=True)
        self._thread.start()

    def send(self, command: Command | Batch) -> None:
        self._submit(command, None)

    def call(self, command: Command | Batch) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(command, future)
        return future

    def shutdown(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout=_SHUTDOWN_JOIN_S)
            self.engine.shutdown()

    def _submit(self, command: Command | Batch, future: concurrent.futures.Future | None) -> None:
        if self.dead is not None:
            raise self.dead
        self._commands.append((command, future))
        self._wake.set()
        if self.dead is not None:  # it died meanwhile: nobody will apply what is queued
            for waiting in self._take_pending():
                waiting.set_exception(self.dead)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if self.service.has_work():
                    outputs = self.service.step()
                    if outputs:
                        self._on_outputs(outputs)
                else:
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting clients
            logger.exception("the engine failed")
            self._die(EngineDeadError(f"the engine stopped: {exc!r}"), self._take_pending)

    def _take_pending(self) -> list[concurrent.futures.Future]:
        pending = []
        while self._commands:
            _, future = self._commands.popleft()
            if future is not None:
                pending.append(future)
        return pending

    def _apply_commands(self) -> None:
        while self._commands:
            command, future = self._commands.popleft()
            try:
                value = self.service.apply(command)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                if future is not None:
                    future.set_exception(exc)
                else:
                    logger.warning("engine command %s failed: %s", type(command).__name__, exc)
            else:
                if future is not None:
                    future.set_result(value)


class MPCoreClient(CoreClient):
    """The engine core in its own process (`python -m omnistream.engine.core.process`), reached over ZMQ `ipc://`
    sockets."""

    def __init__(self, config: EngineConfig, on_outputs: OutputsCallback, on_dead: DeadCallback) -> None:
        super().__init__(on_outputs, on_dead)
        self._runtime_dir = tempfile.mkdtemp(prefix="omnistream-core-")  # 0700: only this user reaches the sockets
        self._context = zmq.Context()
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a busy core; NOBLOCK fails only if it is gone
        self._commands.setsockopt(zmq.LINGER, 0)
        self._events = self._context.socket(zmq.PULL)
        self._events.setsockopt(zmq.LINGER, 0)
        command_address = f"ipc://{self._runtime_dir}/commands"
        event_address = f"ipc://{self._runtime_dir}/events"
        self._commands.bind(command_address)
        self._events.bind(event_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Event)
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._closing = False
        lifeline_read, self._lifeline = os.pipe()  # the core sees EOF on it when we die
        self._exit_pipe, exit_write = os.pipe()  # we see EOF on it when the core dies (it holds the write end)
        if config.cpu_threads is None:
            config = dataclasses.replace(config, cpu_threads=max(1, len(os.sched_getaffinity(0)) - 1))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "omnistream.engine.core.process", "--commands", command_address,
             "--events", event_address, "--lifeline-fd", str(lifeline_read),
             "--log-level", str(logging.getLogger().getEffectiveLevel())],
            stdin=subprocess.PIPE, pass_fds=(lifeline_read, exit_write), start_new_session=True,
        )
        os.close(lifeline_read)
        os.close(exit_write)
        self._finalizer = weakref.finalize(self, _kill_core, self._proc, self._runtime_dir,
                                           (self._lifeline, self._exit_pipe))
        try:
            self._proc.stdin.write(msgspec.json.encode(config))
            self._proc.stdin.close()
            self.ready = self._await_ready()
        except BaseException:
            self._closing = True
            self._close()
            raise
        logger.info("engine core ready in process %d (%s)", self._proc.pid, self.ready.executor)
        self._thread = threading.Thread(target=self._read_events, name="omnistream-core-events", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send(self, command: Command | Batch) -> None:
        self._send(0, command)

    def call(self, command: Command | Batch) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._ids)
        self._pending[call_id] = future
        try:
            self._send(call_id, command)
        except BaseException:
            self._pending.pop(call_id, None)
            raise
        return future

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.dead is None and self._proc.poll() is None:
            try:
                self._send(0, Shutdown())
                self._proc.wait(_SHUTDOWN_JOIN_S)
            except (EngineDeadError, subprocess.TimeoutExpired):
                pass  # _close kills it
        self._thread.join(timeout=5)
        self._close()

    # ---- internals ---------------------------------------------------------------------------------

    def _send(self, call_id: int, command: Command | Batch) -> None:
        if self.dead is not None:
            raise self.dead
        with self._send_lock:
            payload = self._encoder.encode(Call(call_id=call_id, command=command))
            try:
                self._commands.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                raise EngineDeadError("the engine core is not connected") from None

    def _await_ready(self) -> Ready:
        while True:
            if self._events.poll(_POLL_MS):
                event = self._decoder.decode(self._events.recv())
                if isinstance(event, Ready):
                    return event
                if isinstance(event, StartupFailed):
                    if event.error_type == "ValueError":  # a configuration problem: say it plainly
                        raise ValueError(event.message)
                    raise RuntimeError(f"the engine core failed to start: {event.error_type}: {event.message}")
                raise RuntimeError(f"unexpected {type(event).__name__} from the engine core before it was ready")
            if self._proc.poll() is not None:
                raise RuntimeError(f"the engine core exited with code {self._proc.returncode} during start-up")

    def _read_events(self) -> None:
        poller = zmq.Poller()
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._exit_pipe, zmq.POLLIN)
        while not self._closing:
            ready = dict(poller.poll(_POLL_MS))
            if self._events in ready:
                self._drain_events()
            elif self._exit_pipe in ready:  # exited, and every event it sent has been read
                if not self._closing:
                    self._fail(f"the engine core process exited (code {self._proc.wait()})")
                return

    def _drain_events(self) -> None:
        while True:
            try:
                frame = self._events.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = self._decoder.decode(frame)
            if isinstance(event, Outputs):
                self._on_outputs(event.outputs)
            elif isinstance(event, Reply):
                self._resolve(event)
            elif isinstance(event, Died):
                self._fail(f"the engine core stopped: {event.message}")

    def _resolve(self, reply: Reply) -> None:
        future = self._pending.pop(reply.call_id, None)
        if future is None or future.done():
            return
        if reply.error_type is None:
            future.set_result(reply.value)
        elif reply.error_type == "ValueError":  # bad input: the API answers 4xx
            future.set_exception(ValueError(reply.message))
        else:
            future.set_exception(RuntimeError(f"{reply.error_type}: {reply.message}"))

    def _fail(self, message: str) -> None:
        self._die(EngineDeadError(message), self._take_pending)

    def _take_pending(self) -> list[concurrent.futures.Future]:
        pending = list(self._pending.values())
        self._pending.clear()
        return pending

    def _close(self) -> None:
        self._finalizer()
        self._commands.close()
        self._events.close()
        self._context.term()


def _kill_core(proc: subprocess.Popen, runtime_dir: str, fds: tuple[int, ...]) -> None:
    """Last step of shutdown (or garbage collection of a client never shut down): no core outlives us."""
    for kill in (proc.terminate, proc.kill):
        if proc.poll() is None:
            kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                continue
    for fd in fds:
        os.close(fd)
    shutil.rmtree(runtime_dir, ignore_errors=True)
