"""Executors run the model for the engine core: in this process (TP=1) or over N tensor-parallel ranks.

Owns worker processes, the per-step broadcast and failure detection; it never schedules.

Tensor parallelism (`LLM(tensor_parallel_size=N)`): the engine-core process is rank 0 and spawns ranks 1..N-1
("spawn" processes, one device each: cuda:<local rank> with NCCL, or CPU with gloo). Every rank loads only its
shard of the weights and allocates only its KV heads; rank 0 runs the scheduler and broadcasts each
SchedulerOutput (msgspec bytes over a gloo group); every rank executes it, and rank 0's sampled tokens are the
answer (logits are gathered, so the others compute the same and discard them). `launch` returns a StepFuture
(overlapped scheduling): every rank launches the same steps in the same order, and each keeps its own copy of
the sampled ids on its device (last_sampled), which later steps read.
Single node (default): rendezvous through a file in a temporary directory and gloo bound to loopback.
Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and MASTER_PORT (free there) on every node,
start the engine on node 0 and `python -m omnistream.engine.worker.tp_worker --tensor-parallel-size N` on the others;
ranks are node-major (node k holds ranks k*N/NNODES ...).
Failures: a worker that dies, raises or stops answering ends the engine with EngineDeadError naming the rank
(collectives time out after distributed_timeout_s); workers exit when their parent dies, and the engine kills
and joins them on shutdown() and at interpreter exit.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import shutil
import signal
import tempfile
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

import msgspec
import torch
import torch.distributed as dist
from torch import nn

from omnistream.engine.checkpoint.model_config import ThinkerConfig
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.errors import EngineDeadError
from omnistream.engine.model_executor.distributed import (
    get_tp_world_size,
    set_tp_group,
    tp_group_hidden,
)
from omnistream.engine.checkpoint.speech_config import SpeechConfig
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.model_executor.speech_loader import load_speech_models
from omnistream.engine.worker.model_runner import ModelRunner
from omnistream.engine.worker.speech_runner import SpeechRunner
from omnistream.engine.worker.step_future import StepFuture
from omnistream.engine.worker.token_bitmask import PendingMasks
from omnistream.engine.worker.tp_worker import (
    ERROR_KEY,
    INIT_KEY,
    NOOP,
    SHUTDOWN,
    Rank,
    Topology,
    WorkerInit,
    broadcast_bytes,
    cpu_threads_per_rank,
    kv_cache_blocks,
    open_store,
    worker_main,
)
from omnistream.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DIAGNOSE_WAIT_S = 2.0  # after a failed step, how long to wait for a dying worker to show its exit code
_JOIN_S = 5.0  # how long shutdown waits for a worker before killing it


class Executor(ABC):
    """Runs SchedulerOutputs on the model; holds rank 0's model (for config and media) and the KV block count."""

    model: nn.Module
    model_config: ThinkerConfig
    dtype: torch.dtype
    device: torch.device
    num_kv_blocks: int  # per rank: every rank holds this many blocks of its own KV heads
    speech_config: SpeechConfig | None = None  # the speech lane's models are loaded (TP=1 only in v1)

    @abstractmethod
    def launch(self, scheduler_output: SchedulerOutput, grammar_bitmask: PendingMasks | None = None) -> StepFuture:
        """Start one step; its output arrives through the future. `grammar_bitmask` (structured outputs' masks
        being filled) is waited for before sampling."""

    def execute_model(
        self, scheduler_output: SchedulerOutput, grammar_bitmask: PendingMasks | None = None
    ) -> ModelRunnerOutput:
        return self.launch(scheduler_output, grammar_bitmask).result()

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers and devices; safe to call twice."""


def make_executor(config: EngineConfig, model_path: str, eos_token_ids: list[int]) -> Executor:
    if config.tensor_parallel_size == 1:
        return UniProcExecutor(config, model_path, eos_token_ids)
    if config.enable_speech:
        logger.warning("the speech lane runs at tensor_parallel_size 1 only: this engine answers in text")
    return MultiprocTPExecutor(config, model_path, eos_token_ids)


class UniProcExecutor(Executor):
    """TP=1: the model runner in this process, called directly (whole even beside a TP engine's rank 0)."""

    def __init__(self, config: EngineConfig, model_path: str, eos_token_ids: list[int]) -> None:
        self.device = config.torch_device()
        with tp_group_hidden():
            self.model, self.model_config = load_model(
                model_path, None if config.dtype == "auto" else config.dtype, self.device, config.attention_backend)
        self.dtype = next(self.model.parameters()).dtype
        # the speech lane (models and talker KV) first: the thinker's KV cache takes the memory left after it
        speech = load_speech_models(model_path, self.dtype, self.device) if config.enable_speech else None
        speech_runner = None
        if speech is not None:
            self.speech_config = speech.config
            speech_runner = SpeechRunner(
                speech, self.model, config.talker_kv_blocks(), config.block_size, self.device,
                max_num_voices=config.max_num_voices, enforce_eager=config.enforce_eager,
            )
        self.num_kv_blocks = kv_cache_blocks(self.model, config, self.dtype, self.device)
        with tp_group_hidden():  # graph capture runs the forward, which must not join a TP engine's group
            self.runner = ModelRunner(
                self.model, num_kv_blocks=self.num_kv_blocks, block_size=config.block_size, dtype=self.dtype,
                device=self.device, eos_token_ids=eos_token_ids, max_num_seqs=config.max_num_seqs,
                max_model_len=config.max_model_len, seed=config.seed, enforce_eager=config.enforce_eager,
            )
        self.runner.speech = speech_runner

    def launch(self, scheduler_output: SchedulerOutput, grammar_bitmask: PendingMasks | None = None) -> StepFuture:
        if get_tp_world_size() == 1:
            return self.runner.launch(scheduler_output, grammar_bitmask)
        with tp_group_hidden():  # a TP engine lives in this process too: its group is not ours
            return self.runner.launch(scheduler_output, grammar_bitmask)

    def shutdown(self) -> None:
        pass


class MultiprocTPExecutor(Executor):
    """TP=N: this process is rank 0; the other ranks of this node are spawned worker processes.

    Each step is broadcast (size, then msgspec payload) over a gloo group: the transport torch.distributed
    already set up, so it needs no extra sockets and spans nodes the same way. A heartbeat keeps idle workers
    inside the collective timeout, so a timeout means a hung rank, never an idle engine.
    """

    def __init__(self, config: EngineConfig, model_path: str, eos_token_ids: list[int]) -> None:
        if get_tp_world_size() > 1:
            raise RuntimeError("a tensor-parallel engine is already running in this process; shut it down first")
        self.config = config
        self.timeout_s = config.distributed_timeout_s
        self.topology = Topology.from_env(config.tensor_parallel_size)
        if self.topology.node_rank != 0:
            raise ValueError("the engine runs on NODE_RANK 0; other nodes run `python -m omnistream.engine.worker.tp_worker`")
        self.device = config.torch_device()
        local = self.topology.local_world_size
        if self.device.type == "cuda" and torch.cuda.device_count() < local:
            raise ValueError(f"tensor_parallel_size needs {local} GPUs on this node, found {torch.cuda.device_count()}")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.rank: Rank | None = None
        self._dead: EngineDeadError | None = None
        self._closed = False
        self._send_lock = threading.Lock()
        self._last_send = time.monotonic()
        self._stop_heartbeat = threading.Event()
        self._threads = torch.get_num_threads()
        self._tmpdir = tempfile.mkdtemp(prefix="omnistream-tp-")
        self._finalizer = weakref.finalize(self, _kill, self.procs, self._tmpdir)
        try:
            self._start(model_path, eos_token_ids)
        except BaseException as exc:
            # a ValueError is a configuration problem (e.g. heads not divisible by N): every rank has it, say it plainly
            plain = type(exc) is ValueError or not isinstance(exc, Exception)
            error = None if plain else self._diagnose(exc, "start-up")
            self.shutdown()
            if error is None:
                raise
            raise error from exc

    def _start(self, model_path: str, eos_token_ids: list[int]) -> None:
        topology, device_type = self.topology, self.device.type
        store = (f"file://{self._tmpdir}/rendezvous" if topology.nnodes == 1
                 else f"tcp://{topology.master_addr}:{topology.master_port}")
        context = multiprocessing.get_context("spawn")
        pipes = []
        for local_rank in range(1, topology.local_world_size):
            reader, writer = context.Pipe(duplex=False)
            info = topology.rank_info(local_rank, store, self.timeout_s)
            proc = context.Process(target=worker_main, args=(info, writer), name=f"omnistream-tp-rank-{info.rank}",
                                   daemon=True)
            proc.start()
            writer.close()
            self.procs.append(proc)
            pipes.append(reader)
        info = topology.rank_info(0, store, self.timeout_s)
        self.store = open_store(info)
        init = WorkerInit(config=dataclasses.asdict(self.config), model_path=model_path, eos_token_ids=eos_token_ids,
                          backend="nccl" if device_type == "cuda" else "gloo", device_type=device_type)
        self.store.set(INIT_KEY, msgspec.msgpack.encode(init))
        self._wait_started(pipes)
        if device_type == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(topology.local_world_size))
        self.rank = Rank(info, init, self.store)
        self.model, self.model_config, self.dtype = self.rank.model, self.rank.model_config, self.rank.dtype
        self.device, self.num_kv_blocks, self.runner = self.rank.device, self.rank.num_kv_blocks, self.rank.runner
        self._encoder = msgspec.msgpack.Encoder()
        threading.Thread(target=self._heartbeat, name="omnistream-tp-heartbeat", daemon=True).start()
        logger.info("tensor parallel: %d ranks on %d node(s), %s", topology.world_size, topology.nnodes, init.backend)

    def _wait_started(self, pipes: list[multiprocessing.connection.Connection]) -> None:
        """Fail fast when a worker dies before it reaches the rendezvous (e.g. it cannot import)."""
        deadline = time.monotonic() + self.timeout_s
        for proc, pipe in zip(self.procs, pipes):
            ready = multiprocessing.connection.wait([pipe, proc.sentinel], timeout=max(0, deadline - time.monotonic()))
            try:
                if pipe not in ready or pipe.recv() != b"started":
                    raise EOFError
            except EOFError:
                raise RuntimeError(f"worker {proc.name} did not start") from None
            finally:
                pipe.close()

    def launch(self, scheduler_output: SchedulerOutput, grammar_bitmask: PendingMasks | None = None) -> StepFuture:
        def start() -> StepFuture:
            if grammar_bitmask is not None:  # every rank gets the same masks, in the broadcast step
                scheduler_output.grammar_bitmask = grammar_bitmask.result().astype("<i4", copy=False).tobytes()
            for proc in self.procs:
                if not proc.is_alive():
                    raise RuntimeError(f"{proc.name} is not running")
            self._send(self._encoder.encode(scheduler_output))
            return self.runner.launch(scheduler_output)

        future = self._guarded(start)
        return StepFuture(lambda: self._guarded(future.result))

    def _guarded(self, call: Callable[[], T]) -> T:
        """Run a part of a step; any failure kills the executor (the ranks are out of step) and names the rank."""
        if self._dead is not None:
            raise self._dead
        try:
            return call()
        except BaseException as exc:
            self._dead = self._diagnose(exc, "a step")
            if isinstance(exc, Exception):
                raise self._dead from exc
            raise

    def _send(self, payload: bytes | int) -> None:
        with self._send_lock:
            broadcast_bytes(payload, self.rank.control)
            self._last_send = time.monotonic()

    def _heartbeat(self) -> None:
        interval = min(30.0, self.timeout_s / 4)
        while not self._stop_heartbeat.wait(interval / 2):
            if self._dead is None and time.monotonic() - self._last_send >= interval:
                try:
                    self._send(NOOP)
                except Exception as exc:  # the next step reports it with the rank's cause
                    logger.warning("tensor-parallel heartbeat failed: %s", exc)
                    return

    def _diagnose(self, exc: BaseException, during: str) -> EngineDeadError:
        """Name the rank that failed: a worker that exited (its exit code, its traceback if it left one), else 0."""
        deadline = time.monotonic() + _DIAGNOSE_WAIT_S
        while time.monotonic() < deadline and all(proc.exitcode is None for proc in self.procs):
            time.sleep(0.05)
        problems = []
        for proc in self.procs:
            if proc.exitcode is None:
                continue
            rank = int(proc.name.rsplit("-", 1)[1])
            code = proc.exitcode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            report = self._error_report(rank)
            problems.append(f"rank {rank} ({how})" + (f": {report}" if report else ""))
        if not problems:  # a remote rank may have left a report; else rank 0's own error (or a timeout) is all
            problems = [f"rank {r}: {self._error_report(r)}" for r in range(self.topology.world_size)
                        if self._error_report(r)]
        if not problems:
            hint = "" if "Timed out" not in str(exc) else (
                f" (a rank is hung or slower than distributed_timeout_s={self.timeout_s:g})")
            problems = [f"no worker exited; rank 0 got {exc!r}{hint}"]
        message = f"tensor-parallel engine failed during {during}; " + "; ".join(problems)
        logger.error(message)
        return EngineDeadError(message)

    def _error_report(self, rank: int) -> str:
        """The last line of the traceback a failed worker left in the store ('' if none)."""
        store = getattr(self, "store", None)
        key = ERROR_KEY.format(rank=rank)
        try:
            if store is None or not store.check([key]):
                return ""
            return store.get(key).decode().strip().splitlines()[-1]
        except Exception:
            return ""

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_heartbeat.set()
        if self._dead is None and self.rank is not None:
            try:
                self._send(SHUTDOWN)
            except Exception as exc:
                logger.warning("could not tell the tensor-parallel workers to stop: %s", exc)
        for proc in self.procs:
            proc.join(_JOIN_S if self._dead is None else 0.5)
        self._finalizer()  # kills what is left and removes the rendezvous directory
        if self.rank is not None:
            self.rank.close()
        else:
            _clear_tp_state()
        torch.set_num_threads(self._threads)


def _kill(procs: list[multiprocessing.process.BaseProcess], tmpdir: str) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(_JOIN_S)
    shutil.rmtree(tmpdir, ignore_errors=True)


def _clear_tp_state() -> None:
    set_tp_group(None)
    if dist.is_initialized():
        dist.destroy_process_group()

