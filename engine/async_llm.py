"""AsyncLLM: the asyncio API (streams of RequestOutputs, abort, live sessions) over an engine core.

The engine core runs in one dedicated thread: every change to it (add, abort, append input) is a
command queued to that thread and applied between steps, so the event loop never blocks on a step
and the scheduler is never touched from two threads. (The engine-core process comes with the server.)
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.engine_core import EngineCore
from omnistream.engine.executor import EngineDeadError
from omnistream.engine.messages import EngineCoreRequest
from omnistream.engine.output_processor import OutputProcessor
from omnistream.engine.outputs import RequestOutput
from omnistream.engine.session import StreamingSession
from omnistream.multimodal.processor import InputProcessor, MediaLimits
from omnistream.scheduler.outputs import EngineCoreOutput
from omnistream.scheduler.sampling_params import SamplingParams

_IDLE_WAIT_S = 0.05  # how long the engine thread sleeps when there is nothing to compute


class AsyncLLM:
    def __init__(self, model: str | None = None, limit_mm_per_prompt: dict[str, int] | None = None,
                 **engine_kwargs: Any) -> None:
        self.engine = EngineCore(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        limits = MediaLimits() if limit_mm_per_prompt is None else MediaLimits(max_items=dict(limit_mm_per_prompt))
        self.input_processor = InputProcessor(self.tokenizer, self.engine.model_config, limits)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._sessions: set[str] = set()
        self._commands: collections.deque[tuple[Callable[[], Any], asyncio.Future | None]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._engine_loop, name="omnistream-engine", daemon=True)
        self._thread.start()

    # ---- public API --------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | dict[str, Any],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative RequestOutputs of one request; closing the iterator aborts the request."""
        params = sampling_params or SamplingParams()
        processed = await asyncio.to_thread(self.input_processor.process_prompt, prompt)
        request_id = request_id or f"req-{next(self._ids)}"
        queue = self._open_stream(request_id)
        try:
            await self._call(lambda: self._add(request_id, processed, params))
            async for output in self._drain(queue):
                yield output
                if output.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not self._stopping:
                self._post(lambda: self._abort(request_id))

    async def abort(self, request_id: str) -> None:
        await self._call(lambda: self._abort(request_id))

    async def open_session(
        self,
        system_prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        audio_window_s: float = 2.0,
        session_id: str | None = None,
    ) -> StreamingSession:
        """A live conversation: append audio/text as it arrives, commit a turn, stream the answer."""
        session = StreamingSession(
            self, session_id or f"session-{next(self._ids)}", system_prompt,
            sampling_params or SamplingParams(max_tokens=256), audio_window_s,
        )
        await session.start()
        return session

    @property
    def errored(self) -> bool:
        """True once the engine thread has stopped on an error."""
        return self._error is not None

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # ---- plumbing used by StreamingSession ----------------------------------------------------

    def _add(self, request_id: str, processed: Any, params: SamplingParams) -> None:
        if params.n != 1:
            raise ValueError("AsyncLLM.generate streams one sample per request; use n=1")
        self.output_processor.add_request(request_id, processed.prompt, processed.token_ids, params)
        try:
            self.engine.add_request(EngineCoreRequest.from_processed(request_id, processed, params, time.monotonic()))
        except ValueError:
            self.output_processor.forget(request_id)
            raise

    def _abort(self, request_id: str) -> None:
        self.engine.abort_requests(self.output_processor.forget(request_id) or [request_id])

    def _cancel_turn(self, session_id: str) -> None:
        """Engine thread: stop a session's answer and end its stream with finish_reason "abort"."""
        if self.engine.cancel_turn(session_id):
            ended = EngineCoreOutput(req_id=session_id, new_token_ids=[], finish_reason="abort", session_open=True)
            self._deliver([ended])

    def _open_stream(self, request_id: str) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    async def _drain(self, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps; its result or exception comes back here."""
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped: {self._error!r}")
        future = asyncio.get_running_loop().create_future()
        self._commands.append((fn, future))
        self._wake.set()
        return await future

    def _post(self, fn: Callable[[], Any]) -> None:
        """Fire-and-forget command (used from finally blocks, where awaiting is not allowed)."""
        self._commands.append((fn, None))
        self._wake.set()

    # ---- the engine thread --------------------------------------------------------------------

    def _engine_loop(self) -> None:
        try:
            while not self._stopping:
                self._apply_commands()
                if self.engine.has_work():
                    self._deliver(self.engine.step())
                else:
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting clients
            self._error = exc
            dead = EngineDeadError(f"the engine stopped: {exc!r}")
            for loop, queue in list(self._streams.values()):
                loop.call_soon_threadsafe(queue.put_nowait, dead)
            while self._commands:
                _, future = self._commands.popleft()
                if future is not None:
                    future.get_loop().call_soon_threadsafe(_fail, future, dead)

    def _apply_commands(self) -> None:
        while self._commands:
            fn, future = self._commands.popleft()
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                if future is not None:
                    future.get_loop().call_soon_threadsafe(_fail, future, exc)
            else:
                if future is not None:
                    future.get_loop().call_soon_threadsafe(_succeed, future, result)

    def _deliver(self, core_outputs: list) -> None:
        outputs, stopped = self.output_processor.process_outputs(core_outputs)
        for request_id in stopped:  # a stop string: a session's turn ends, a request finishes
            if request_id in self._sessions:
                self.engine.cancel_turn(request_id)
            else:
                self.engine.finish_stopped([request_id])
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                loop, queue = stream
                loop.call_soon_threadsafe(queue.put_nowait, output)


def _succeed(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

