"""CoreService: applies engine-core commands to an EngineCore and gathers what to report after each step.

Used by both transports (the engine-core process and the in-process thread), so a command means the same
thing whichever carries it. Commands run between steps, never during one.
"""

from __future__ import annotations

import torch

from omnistream.engine.core.engine_core import EngineCore
from omnistream.engine.core.messages import (
    AbortRequests,
    AddRequest,
    AppendInput,
    Batch,
    CancelTurn,
    Command,
    CommitTurn,
    EngineStats,
    FinishStopped,
    GetStats,
    OpenSession,
    Ready,
    RollbackInput,
    SessionTail,
    SessionTailValue,
    Shutdown,
)
from omnistream.scheduler.outputs import EngineCoreOutput


class CoreService:
    def __init__(self, engine: EngineCore) -> None:
        self.engine = engine
        self.stopping = False
        self._pending: list[EngineCoreOutput] = []  # outputs made by commands, sent with the next batch

    def ready(self) -> Ready:
        executor = self.engine.executor
        speech = self.engine.scheduler.config.speech
        return Ready(max_model_len=self.engine.max_model_len, executor=type(executor).__name__,
                     num_kv_blocks=executor.num_kv_blocks, cpu_threads=torch.get_num_threads(),
                     voices=sorted(speech.speakers) if speech is not None else [])

    def apply(self, command: Command | Batch) -> EngineStats | SessionTailValue | None:
        """Apply one command (or a batch, in order); raises what the engine raises (ValueError: bad input)."""
        if isinstance(command, Batch):
            for inner in command.commands:
                self.apply(inner)
            return None
        engine = self.engine
        match command:
            case AddRequest(request=request):
                engine.add_request(request)
            case AbortRequests(request_ids=ids):
                engine.abort_requests(ids)
            case FinishStopped(request_ids=ids):
                engine.finish_stopped(ids)
            case OpenSession():
                engine.open_session(command.session_id, command.prompt_token_ids, command.position_segments)
            case AppendInput():
                engine.append_input(command.session_id, command.token_ids, command.mm_features,
                                    command.position_segments)
            case CommitTurn():
                engine.commit_turn(command.session_id, command.token_ids, command.sampling_params,
                                   command.position_segments)
            case CancelTurn(session_id=session_id, announce=announce):
                if engine.cancel_turn(session_id) and announce:
                    self._pending.append(EngineCoreOutput(req_id=session_id, new_token_ids=[],
                                                          finish_reason="abort", session_open=True))
            case RollbackInput(session_id=session_id, num_tokens=num_tokens):
                engine.rollback_input(session_id, num_tokens)
            case SessionTail(session_id=session_id):
                num_tokens, last = engine.session_tail(session_id)
                return SessionTailValue(num_tokens=num_tokens, last_token_id=last)
            case GetStats(reset_lag_samples=reset):
                stats = self.stats()
                if reset:
                    engine.scheduler.stream_lags.clear()
                return stats
            case Shutdown():
                self.stopping = True
            case _:
                raise ValueError(f"unknown engine-core command {type(command).__name__}")
        return None

    def has_work(self) -> bool:
        return bool(self._pending) or self.engine.has_work()

    def step(self) -> list[EngineCoreOutput]:
        """Outputs made by commands since the last call, then one engine step's (if there is work)."""
        outputs, self._pending = self._pending, []
        if self.engine.has_work():
            outputs.extend(self.engine.step())
        return outputs

    def stats(self) -> EngineStats:
        scheduler = self.engine.scheduler
        lags = scheduler.lag_percentiles((50, 99))
        pool = scheduler.kv_cache_manager.block_pool
        return EngineStats(
            scheduler=scheduler.make_stats(), lag_count=int(lags["count"] or 0), lag_p50=lags["p50"],
            lag_p99=lags["p99"], num_requests=scheduler.get_num_unfinished_requests(),
            num_free_blocks=pool.get_num_free_blocks(), num_blocks=pool.num_blocks,
        )
