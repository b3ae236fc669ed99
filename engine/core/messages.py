"""The engine-core protocol: msgspec messages between the front end (AsyncLLM) and the engine core.

Front end -> core: a `Call` wraps one command (or a `Batch` of them, applied in order in one go); a
non-zero call id asks for a `Reply`. Core -> front end: `Ready` or `StartupFailed` once, then `Outputs`
(one per engine step that produced any), `Reply`s, and `Died` if the core stops on an error. Everything is
msgpack-encoded msgspec Structs over ZMQ (engine/core/client.py, engine/core/process.py): nothing crossing
the boundary is ever unpickled. The in-process client applies the very same commands without encoding.
"""

from __future__ import annotations

from typing import Union

import msgspec

from omnistream.engine.core.request import EngineCoreRequest
from omnistream.scheduler.mm_feature import MultiModalFeature
from omnistream.scheduler.outputs import EngineCoreOutput, SchedulerStats
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.tensor_data import PositionSegment

# ---- commands (front end -> core) ---------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True):
    request: EngineCoreRequest


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class FinishStopped(msgspec.Struct, tag=True):
    """Requests the front end found a stop string in (the core cannot see text)."""

    request_ids: list[str]


class OpenSession(msgspec.Struct, tag=True):
    session_id: str
    prompt_token_ids: list[int]
    position_segments: list[PositionSegment]


class AppendInput(msgspec.Struct, tag=True):
    session_id: str
    token_ids: list[int]
    mm_features: list[MultiModalFeature]
    position_segments: list[PositionSegment]


class CommitTurn(msgspec.Struct, tag=True):
    session_id: str
    token_ids: list[int]
    sampling_params: SamplingParams
    position_segments: list[PositionSegment]


class CancelTurn(msgspec.Struct, tag=True):
    """Stop a session's answer. With `announce`, a cancelled answer's stream ends with finish_reason
    "abort"; without (a stop string already ended it on the front end), nothing is reported."""

    session_id: str
    announce: bool = True


class RollbackInput(msgspec.Struct, tag=True):
    """Drop an open session's input after its first num_tokens tokens (audio discarded before its commit)."""

    session_id: str
    num_tokens: int


class SessionTail(msgspec.Struct, tag=True):
    """Asks for a session's (number of tokens, last token id)."""

    session_id: str


class GetStats(msgspec.Struct, tag=True):
    reset_lag_samples: bool = False  # start a new window of lag samples after this snapshot (benchmarks)


class Shutdown(msgspec.Struct, tag=True):
    pass


Command = Union[
    AddRequest, AbortRequests, FinishStopped, OpenSession, AppendInput, CommitTurn, CancelTurn, RollbackInput,
    SessionTail, GetStats, Shutdown,
]


class Batch(msgspec.Struct, tag=True):
    """Commands applied in order between two steps; the first that fails stops the batch."""

    commands: list[Command]


class Call(msgspec.Struct, array_like=True):
    call_id: int  # 0: fire and forget, no Reply
    command: Union[Command, Batch]


# ---- replies and events (core -> front end) -----------------------------------------------------


class EngineStats(msgspec.Struct, tag=True):
    """A snapshot of the engine core for /metrics and tests."""

    scheduler: SchedulerStats
    lag_count: int  # samples behind the percentiles (seconds live input waited before it was scheduled)
    lag_p50: float | None
    lag_p99: float | None
    num_requests: int  # requests and open sessions the scheduler holds
    num_free_blocks: int
    num_blocks: int


class SessionTailValue(msgspec.Struct, tag=True):
    num_tokens: int
    last_token_id: int | None


class Ready(msgspec.Struct, tag=True):
    max_model_len: int
    executor: str  # the executor class, e.g. UniProcExecutor
    num_kv_blocks: int
    cpu_threads: int  # torch CPU threads of the core
    voices: list[str] = []  # the speech lane's voices (lower case); empty: this engine answers in text only


class StartupFailed(msgspec.Struct, tag=True):
    error_type: str
    message: str


class Outputs(msgspec.Struct, tag=True):
    outputs: list[EngineCoreOutput]


class Reply(msgspec.Struct, tag=True):
    call_id: int
    value: Union[EngineStats, SessionTailValue, None] = None
    error_type: str | None = None  # "ValueError" for bad input, else the failing exception's class name
    message: str = ""


class Died(msgspec.Struct, tag=True):
    message: str


Event = Union[Ready, StartupFailed, Outputs, Reply, Died]
