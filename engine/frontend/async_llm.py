"""AsyncLLM: the asyncio API (streams of RequestOutputs, abort, live sessions) over an engine core.

The engine core runs in its own process by default (engine/core/process.py, reached over msgspec + ZMQ by
engine/core/client.py), or in a thread of this process with `engine_process=False`. Either way this front end
processes prompts and media, detokenizes, finds stop strings and fans outputs out to the asyncio streams;
the core only schedules and computes. Every change to the core is a command applied between two steps, so
the event loop never blocks on a step. If the core dies, every stream and call fails with EngineDeadError
and `errored` turns true at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.model_config import ThinkerConfig, read_model_config
from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.client import CoreClient
from omnistream.engine.core.messages import AddRequest, EngineStats, GetStats
from omnistream.engine.core.request import EngineCoreRequest
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.frontend.admission import Admission
from omnistream.engine.frontend.grammar_check import DEFAULT_TIMEOUT_S, GrammarCheck
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.engine.frontend.session import StreamingSession
from omnistream.engine.frontend.streams import EngineStreams, RequestListener
from omnistream.multimodal.processor import InputProcessor, MediaLimits
from omnistream.scheduler.sampling_params import SamplingParams, check_token_ids

# Prompts this small are processed on the event loop (about a millisecond at most: a hop to a worker thread and
# back costs as much, and under a burst of requests it lets them reach the engine one scheduling delay apart).
INLINE_PROMPT_CHARS = 2048
INLINE_PROMPT_TOKENS = 8192


def _is_short_text(prompt: str | dict[str, Any]) -> bool:
    """A prompt without media whose text or token ids are short."""
    if isinstance(prompt, str):
        return len(prompt) <= INLINE_PROMPT_CHARS
    if not isinstance(prompt, dict) or prompt.get("multi_modal_data"):
        return False
    text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
    if token_ids is not None:
        return isinstance(token_ids, list) and len(token_ids) <= INLINE_PROMPT_TOKENS
    return isinstance(text, str) and len(text) <= INLINE_PROMPT_CHARS


class AsyncLLM:
    def __init__(self, model: str | None = None, limit_mm_per_prompt: dict[str, int] | None = None,
                 engine_process: bool = True, max_queued_requests: int | None = None,
                 max_live_sessions: int | None = None, grammar_compile_timeout_s: float = DEFAULT_TIMEOUT_S,
                 **engine_kwargs: Any) -> None:
        model_path = str(model or default_model_path())  # built here once, so the core never races to build it
        config = EngineConfig(model=model_path, **engine_kwargs)
        self.model_path = model_path
        self.tokenizer = Tokenizer(model_path)
        self.model_config = ThinkerConfig.from_dict(read_model_config(model_path))
        limits = MediaLimits() if limit_mm_per_prompt is None else MediaLimits(max_items=dict(limit_mm_per_prompt))
        self.input_processor = InputProcessor(self.tokenizer, self.model_config, limits)
        self._ids = itertools.count()
        self.admission = Admission(max_queued_requests, max_live_sessions)
        self.grammar_check = GrammarCheck(self.tokenizer, self.model_config.text.vocab_size, grammar_compile_timeout_s)
        self.streams = EngineStreams(config, self.tokenizer, engine_process)
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
        await self.grammar_check.check(params.structured_outputs)
        self.admission.admit_request()
        waiting = True  # for its first output: counted against max_queued_requests
        try:
            if _is_short_text(prompt):  # cheaper here than the hop to a worker thread and back
                processed = self.input_processor.process_prompt(prompt)
            else:
                processed = await asyncio.to_thread(self.input_processor.process_prompt, prompt)
            check_token_ids(processed.token_ids, self.model_config.text.vocab_size, "prompt_token_ids")
            request_id = request_id or f"req-{next(self._ids)}"
            queue = self.streams.open_stream(request_id)
        except BaseException:
            self.admission.request_started()
            raise
        try:
            request = EngineCoreRequest.from_processed(request_id, processed, params, time.monotonic())
            self.streams.register(request_id, processed.prompt, processed.token_ids, params)
            try:
                await self.streams.call(AddRequest(request=request))
            except ValueError:
                self.streams.forget(request_id)
                raise
            async for output in self.streams.drain(queue):
                if waiting:
                    waiting = False
                    self.admission.request_started()
                yield output
                if output.finished:
                    return
        finally:
            if waiting:
                self.admission.request_started()
            self.streams.close_stream(request_id)
            self.streams.abort_soon(request_id)

    async def abort(self, request_id: str) -> None:
        await self.streams.abort(request_id)

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
                self.streams, self.tokenizer, self.model_config, self.admission.session_closed,
                session_id or f"session-{next(self._ids)}", system_prompt,
                sampling_params or SamplingParams(max_tokens=256), audio_window_s, video_fps, self.grammar_check,
            )
            await session.start()
        except BaseException:
            self.admission.session_closed()
            raise
        return session

    async def get_stats(self, reset_lag_samples: bool = False) -> EngineStats:
        """A snapshot of the engine core: scheduler counters, KV blocks, streaming lag (whose samples start
        afresh after this call with `reset_lag_samples`)."""
        return await self.streams.call(GetStats(reset_lag_samples=reset_lag_samples))

    def add_request_listener(self, listener: RequestListener) -> None:
        self.streams.add_listener(listener)

    @property
    def core(self) -> CoreClient:
        return self.streams.core

    @property
    def errored(self) -> bool:
        """True once the engine core has stopped on an error (or its process died)."""
        return self.core.dead is not None

    @property
    def num_live_sessions(self) -> int:
        return len(self.streams.sessions)

    def shutdown(self) -> None:
        self.grammar_check.shutdown()
        self.streams.shutdown()
