"""AsyncLLM: the asyncio API (streams of RequestOutputs, abort, live sessions) over an engine core.

The engine core runs in its own process by default (engine/core_process.py, reached over msgspec + ZMQ by
engine/core_client.py), or in a thread of this process with `engine_process=False`. Either way this front end
processes prompts and media, detokenizes, finds stop strings and fans outputs out to the asyncio streams;
the core only schedules and computes. Every change to the core is a command applied between two steps, so
the event loop never blocks on a step. If the core dies, every stream and call fails with EngineDeadError
and `errored` turns true at once.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from omnistream.engine.admission import Admission
from omnistream.engine.config import ThinkerConfig
from omnistream.engine.core_client import CoreClient, InprocCoreClient, MPCoreClient
from omnistream.engine.core_messages import (
    AbortRequests,
    AddRequest,
    Batch,
    CancelTurn,
    Command,
    EngineStats,
    FinishStopped,
    GetStats,
)
from omnistream.engine.default_model import default_model_path
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.executor import EngineDeadError
from omnistream.engine.loader import read_model_config
from omnistream.engine.messages import EngineCoreRequest
from omnistream.engine.output_processor import OutputProcessor
from omnistream.engine.outputs import RequestOutput
from omnistream.engine.session import StreamingSession
from omnistream.engine.tokenizer import Tokenizer
from omnistream.multimodal.processor import InputProcessor, MediaLimits
from omnistream.scheduler.outputs import EngineCoreOutput
from omnistream.scheduler.sampling_params import SamplingParams


class RequestListener(Protocol):
    """Hears every engine request of every caller (server metrics): its start (a request, or a session's
    turn), each cumulative output (on the core client's thread), and its end without a finished output
    (aborted). Times are time.monotonic()."""

    def on_start(self, request_id: str, now: float) -> None: ...

    def on_output(self, output: RequestOutput, now: float) -> None: ...

    def on_drop(self, request_id: str) -> None: ...


class AsyncLLM:
    def __init__(self, model: str | None = None, limit_mm_per_prompt: dict[str, int] | None = None,
                 engine_process: bool = True, max_queued_requests: int | None = None,
                 max_live_sessions: int | None = None, **engine_kwargs: Any) -> None:
        model_path = str(model or default_model_path())  # built here once, so the core never races to build it
        config = EngineConfig(model=model_path, **engine_kwargs)
        self.model_path = model_path
        self.tokenizer = Tokenizer(model_path)
        self.model_config = ThinkerConfig.from_dict(read_model_config(model_path))
        limits = MediaLimits() if limit_mm_per_prompt is None else MediaLimits(max_items=dict(limit_mm_per_prompt))
        self.input_processor = InputProcessor(self.tokenizer, self.model_config, limits)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._outputs_lock = threading.Lock()  # the output processor is fed by the core's thread, changed by ours
        self._ids = itertools.count()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._sessions: set[str] = set()
        self._stopping = False
        self._listeners: list[RequestListener] = []
        self.admission = Admission(max_queued_requests, max_live_sessions)
        client_type = MPCoreClient if engine_process else InprocCoreClient
        self.core: CoreClient = client_type(config, self._deliver, self._engine_died)
        self.max_model_len = self.core.ready.max_model_len

    # ---- public API --------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | dict[str, Any],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream cumulative RequestOutputs of one request; closing the iterator aborts the request."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("AsyncLLM.generate streams one sample per request; use n=1")
        params.check_vocab(self.model_config.text.vocab_size)
        self.admission.admit_request()
        waiting = True  # for its first output: counted against max_queued_requests
        try:
            processed = await asyncio.to_thread(self.input_processor.process_prompt, prompt)
            request_id = request_id or f"req-{next(self._ids)}"
            queue = self._open_stream(request_id)
        except BaseException:
            self.admission.request_started()
            raise
        try:
            request = EngineCoreRequest.from_processed(request_id, processed, params, time.monotonic())
            with self._outputs_lock:
                self.output_processor.add_request(request_id, processed.prompt, processed.token_ids, params)
            self._started(request_id)
            try:
                await self._call(AddRequest(request=request))
            except ValueError:
                self._forget(request_id)
                raise
            async for output in self._drain(queue):
                if waiting:
                    waiting = False
                    self.admission.request_started()
                yield output
                if output.finished:
                    return
        finally:
            if waiting:
                self.admission.request_started()
            self._streams.pop(request_id, None)
            if not self._stopping and self.core.dead is None:
                self._post(AbortRequests(request_ids=self._forget(request_id)))

    async def abort(self, request_id: str) -> None:
        await self._call(AbortRequests(request_ids=self._forget(request_id)))

    async def open_session(
        self,
        system_prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        audio_window_s: float = 2.0,
        session_id: str | None = None,
        video_fps: float = 2.0,
    ) -> StreamingSession:
        """A live conversation: append audio, camera frames (at `video_fps`) and text as they arrive, commit a
        turn, stream the answer."""
        self.admission.admit_session()
        try:
            session = StreamingSession(
                self, session_id or f"session-{next(self._ids)}", system_prompt,
                sampling_params or SamplingParams(max_tokens=256), audio_window_s, video_fps,
            )
            await session.start()
        except BaseException:
            self.admission.session_closed()
            raise
        return session

    async def get_stats(self, reset_lag_samples: bool = False) -> EngineStats:
        """A snapshot of the engine core: scheduler counters, KV blocks, streaming lag (whose samples start
        afresh after this call with `reset_lag_samples`)."""
        return await self._call(GetStats(reset_lag_samples=reset_lag_samples))

    def add_request_listener(self, listener: RequestListener) -> None:
        self._listeners.append(listener)

    @property
    def errored(self) -> bool:
        """True once the engine core has stopped on an error (or its process died)."""
        return self.core.dead is not None

    @property
    def num_live_sessions(self) -> int:
        return len(self._sessions)

    def shutdown(self) -> None:
        self._stopping = True
        self.core.shutdown()

    # ---- plumbing used by StreamingSession ----------------------------------------------------

    async def _call(self, command: Command | Batch) -> Any:
        """Apply `command` in the engine core between steps; its value or exception comes back here."""
        return await asyncio.wrap_future(self.core.call(command))

    def _post(self, command: Command | Batch) -> None:
        """Fire-and-forget command (used from finally blocks, where awaiting is not allowed)."""
        try:
            self.core.send(command)
        except EngineDeadError:
            pass  # nothing left to tell

    def _forget(self, request_id: str) -> list[str]:
        """Drop a request from the output processor; the engine-core ids to abort."""
        for listener in self._listeners:
            listener.on_drop(request_id)
        with self._outputs_lock:
            return self.output_processor.forget(request_id) or [request_id]

    def _register(self, request_id: str, token_ids: list[int], params: SamplingParams) -> None:
        with self._outputs_lock:
            self.output_processor.add_request(request_id, None, token_ids, params)
        self._started(request_id)

    def _started(self, request_id: str) -> None:
        now = time.monotonic()
        for listener in self._listeners:
            listener.on_start(request_id, now)

    def _open_stream(self, request_id: str) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        if self.core.dead is not None:
            raise self.core.dead
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        return queue

    async def _drain(self, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    # ---- called on the core client's thread ---------------------------------------------------

    def _deliver(self, core_outputs: list[EngineCoreOutput]) -> None:
        with self._outputs_lock:
            outputs, stopped = self.output_processor.process_outputs(core_outputs)
        for request_id in stopped:  # a stop string: a session's turn ends, a request finishes
            if request_id in self._sessions:
                self._post(CancelTurn(session_id=request_id, announce=False))
            else:
                self._post(FinishStopped(request_ids=[request_id]))
        now = time.monotonic()
        for output in outputs:
            for listener in self._listeners:
                listener.on_output(output, now)
            stream = self._streams.get(output.request_id)
            if stream is not None:
                loop, queue = stream
                loop.call_soon_threadsafe(queue.put_nowait, output)

    def _engine_died(self, error: EngineDeadError) -> None:
        for loop, queue in list(self._streams.values()):
            loop.call_soon_threadsafe(queue.put_nowait, error)
