"""EngineStreams: the front end's link to one engine core — the core client, the output processor, and the
asyncio stream of every request or session turn in flight.

AsyncLLM composes one and hands it to each StreamingSession, so a session never reaches into AsyncLLM. Outputs
arrive on the core client's thread (`_deliver`): they are detokenized and checked for stop strings under a lock,
then put on their stream's queue in its own event loop. If the core dies, every open stream gets the error.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.client import CoreClient, InprocCoreClient, MPCoreClient
from omnistream.engine.core.messages import (
    AbortRequests,
    Batch,
    CancelTurn,
    Command,
    FinishStopped,
)
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.errors import EngineDeadError
from omnistream.engine.frontend.output_processor import OutputProcessor
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.scheduler.outputs import EngineCoreOutput
from omnistream.scheduler.sampling_params import SamplingParams


class RequestListener(Protocol):
    """Hears every engine request of every caller (server metrics): its start (a request, or a session's
    turn), each cumulative output (on the core client's thread), and its end without a finished output
    (aborted). Times are time.monotonic()."""

    def on_start(self, request_id: str, now: float) -> None: ...

    def on_output(self, output: RequestOutput, now: float) -> None: ...

    def on_drop(self, request_id: str) -> None: ...


class EngineStreams:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer, engine_process: bool) -> None:
        self.output_processor = OutputProcessor(tokenizer)
        self._outputs_lock = threading.Lock()  # the output processor is fed by the core's thread, changed by ours
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.sessions: set[str] = set()  # ids of open live sessions (their stop strings end a turn, not a request)
        self.stopping = False
        self._listeners: list[RequestListener] = []
        client_type = MPCoreClient if engine_process else InprocCoreClient
        self.core: CoreClient = client_type(config, self._deliver, self._engine_died)

    # ---- commands to the core ------------------------------------------------------------------

    async def call(self, command: Command | Batch) -> Any:
        """Apply `command` in the engine core between steps; its value or exception comes back here."""
        return await asyncio.wrap_future(self.core.call(command))

    def post(self, command: Command | Batch) -> None:
        """Fire-and-forget command (used from finally blocks, where awaiting is not allowed)."""
        try:
            self.core.send(command)
        except EngineDeadError:
            pass  # nothing left to tell

    async def abort(self, request_id: str) -> None:
        await self.call(AbortRequests(request_ids=self.forget(request_id)))

    def abort_soon(self, request_id: str) -> None:
        """Abort without waiting, unless the engine is stopping or dead (then nothing is left to abort)."""
        if not self.stopping and self.core.dead is None:
            self.post(AbortRequests(request_ids=self.forget(request_id)))

    # ---- requests and their streams ------------------------------------------------------------

    def register(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams) -> None:
        """Start detokenizing a request (or a session's turn) and tell the listeners it started."""
        with self._outputs_lock:
            self.output_processor.add_request(request_id, prompt, token_ids, params)
        now = time.monotonic()
        for listener in self._listeners:
            listener.on_start(request_id, now)

    def forget(self, request_id: str) -> list[str]:
        """Drop a request from the output processor; the engine-core ids to abort."""
        for listener in self._listeners:
            listener.on_drop(request_id)
        with self._outputs_lock:
            return self.output_processor.forget(request_id) or [request_id]

    def open_stream(self, request_id: str) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        if self.core.dead is not None:
            raise self.core.dead
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    @staticmethod
    async def drain(queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def add_listener(self, listener: RequestListener) -> None:
        self._listeners.append(listener)

    def shutdown(self) -> None:
        self.stopping = True
        self.core.shutdown()

    # ---- called on the core client's thread ----------------------------------------------------

    def _deliver(self, core_outputs: list[EngineCoreOutput]) -> None:
        with self._outputs_lock:
            outputs, stopped = self.output_processor.process_outputs(core_outputs)
        for request_id in stopped:  # a stop string: a session's turn ends, a request finishes
            if request_id in self.sessions:
                self.post(CancelTurn(session_id=request_id, announce=False))
            else:
                self.post(FinishStopped(request_ids=[request_id]))
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            for listener in self._listeners:
                listener.on_output(output, now)
            stream = self._streams.get(output.request_id)
            if stream is not None:
                loop, queue = stream
                batches.setdefault(loop, []).append((queue, output))
        for loop, batch in batches.items():  # one wake-up of each event loop per step, not one per request
            loop.call_soon_threadsafe(_put_all, batch)

    def _engine_died(self, error: EngineDeadError) -> None:
        for loop, queue in list(self._streams.values()):
            loop.call_soon_threadsafe(queue.put_nowait, error)


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in batch:
        queue.put_nowait(output)
