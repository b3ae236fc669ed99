"""One tensor-parallel rank: join the process group, load this rank's weight shard, then run every broadcast step.

Owns the rank's lifecycle and the wire format between ranks (each SchedulerOutput as msgspec bytes, broadcast
from rank 0 over a gloo "control" group). It never schedules or samples for the engine: rank 0's output is the
answer. `python -m omnistream.engine.worker.tp_worker --tensor-parallel-size N` starts the ranks of one extra node.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from omnistream.engine.checkpoint.model_config import read_model_config
from omnistream.engine.checkpoint.speech_config import SpeechConfig
from omnistream.engine.engine_config import EngineConfig
from omnistream.engine.model_executor.distributed import (
    get_tp_rank,
    set_tp_group,
    tensor_model_parallel_gather,
    tp_group_hidden,
)
from omnistream.engine.model_executor.loader import load_model
from omnistream.engine.model_executor.speech_loader import load_speech_models
from omnistream.engine.worker.model_runner import ModelRunner
from omnistream.engine.worker.speech_runner import SpeechRunner
from omnistream.scheduler.outputs import SchedulerOutput

logger = logging.getLogger(__name__)

SHUTDOWN, NOOP = -1, -2  # control messages carried in the size slot instead of a payload length
INIT_KEY = "omnistream/init"  # store key of the WorkerInit that rank 0 publishes before the rendezvous
ERROR_KEY = "omnistream/error/{rank}"  # store key where a failing rank leaves its traceback


class RankInfo(msgspec.Struct, frozen=True):
    """Where one rank sits and how it reaches the others (everything a rank needs before the process group)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    store: str  # "file:///path" (single node) or "tcp://host:port" (rank 0 hosts a TCPStore)
    timeout_s: float
    loopback: bool  # bind gloo to the loopback interface (single node)


class WorkerInit(msgspec.Struct, frozen=True):
    """What rank 0 tells every other rank before the rendezvous: the engine config and the model."""

    config: dict[str, Any]  # EngineConfig fields
    model_path: str
    eos_token_ids: list[int]
    backend: str  # "nccl" or "gloo"
    device_type: str  # "cuda" or "cpu"


class Rank:
    """This process's share of the model: its process groups, weight shard and model runner."""

    def __init__(self, info: RankInfo, init: WorkerInit, store: dist.Store) -> None:
        self.info, self.store = info, store
        config = EngineConfig(**init.config)
        timeout = timedelta(seconds=info.timeout_s)
        cuda = init.device_type == "cuda"
        self.device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        excepthook = sys.excepthook
        with _gloo_on_loopback(info.loopback):
            dist.init_process_group(init.backend, store=store, rank=info.rank, world_size=info.world_size,
                                    timeout=timeout)
            sys.excepthook = excepthook  # not the rank-prefixing hook init_process_group installs process-wide
            # steps travel on their own CPU group, so NCCL ranks can wait for them without a GPU collective
            self.control = dist.new_group(backend="gloo", timeout=timeout)
        set_tp_group(dist.group.WORLD)
        self.model, self.model_config = load_model(
            init.model_path, None if config.dtype == "auto" else config.dtype, self.device, config.attention_backend)
        self.dtype = next(self.model.parameters()).dtype
        # before the KV budget: rank 0's share of memory is smaller by the lane, and every rank takes its blocks
        speech = load_speech_lane(config, init.model_path, self.model, self.dtype, self.device)
        self.speech_config = None if speech is None else speech.config
        self.num_kv_blocks = self._agree_on_kv_blocks(config)
        self.runner = ModelRunner(
            self.model, num_kv_blocks=self.num_kv_blocks, block_size=config.block_size, dtype=self.dtype,
            device=self.device, eos_token_ids=init.eos_token_ids, max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len, seed=config.seed, enforce_eager=config.enforce_eager,
        )
        self.runner.speech = speech

    def _agree_on_kv_blocks(self, config: EngineConfig) -> int:
        """Every rank holds the same number of blocks (of its own KV heads): the smallest any rank can afford."""
        blocks = torch.tensor([kv_cache_blocks(self.model, config, self.dtype, self.device)], dtype=torch.int64)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=self.control)
        return int(blocks.item())

    def close(self) -> None:
        set_tp_group(None)
        if dist.is_initialized():
            dist.destroy_process_group()


def load_speech_lane(
    config: EngineConfig, model_path: str, thinker: torch.nn.Module, dtype: torch.dtype, device: torch.device
) -> SpeechRunner | None:
    """The speech lane (talker, code predictor, code2wav and the talker's KV) on the first TP rank, or None (no
    talker in the checkpoint, speech disabled, or another rank). v1 runs the lane whole there: its models are
    built unsharded, its forwards join no collective, and it reads the thinker's token embedding whole, which
    under TP is gathered from the vocab shards once here (so every rank must call this, in step)."""
    if not config.enable_speech or SpeechConfig.from_dict(read_model_config(model_path)) is None:
        return None
    table = tensor_model_parallel_gather(thinker.model.embed_tokens.weight, dim=0)
    if get_tp_rank() != 0:
        return None
    with tp_group_hidden():
        models = load_speech_models(model_path, dtype, device)
        embed_tokens = thinker.model.embed_tokens
        if table is not embed_tokens.weight:
            embed_tokens = torch.nn.Embedding.from_pretrained(table, freeze=True)
        return SpeechRunner(
            models, embed_tokens, config.talker_kv_blocks(), config.block_size, device,
            max_num_voices=config.max_num_voices, enforce_eager=config.enforce_eager,
        )


def kv_cache_blocks(model: torch.nn.Module, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> int:
    """KV blocks that fit this rank's budget (the model reports only this rank's KV heads)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = math.prod(model.kv_cache_shape_per_layer(1, config.block_size)) * model.num_layers
    num_blocks = config.kv_cache_bytes(device) // (per_block * dtype.itemsize)
    if num_blocks < 1:
        raise ValueError("kv_cache_memory is too small for a single KV block")
    return int(num_blocks)


def broadcast_bytes(payload: bytes | int | None, group: dist.ProcessGroup) -> bytes | int:
    """Rank 0 passes bytes (or SHUTDOWN/NOOP); the others pass None and get the same bytes (or the code) back."""
    size = torch.tensor([payload if isinstance(payload, int) else len(payload or b"")], dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    length = int(size.item())
    if length < 0:
        return length
    buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(length,
                                                                                                 dtype=torch.uint8)
    if length:
        dist.broadcast(buffer, src=0, group=group)
    return buffer.numpy().tobytes()


def open_store(info: RankInfo) -> dist.Store:
    """The rendezvous store: a file on one node, else the TCPStore hosted by rank 0 at MASTER_ADDR:MASTER_PORT."""
    timeout = timedelta(seconds=info.timeout_s)
    if info.store.startswith("file://"):
        store = dist.FileStore(info.store.removeprefix("file://"), info.world_size)
        store.set_timeout(timeout)
        return store
    host, _, port = info.store.removeprefix("tcp://").rpartition(":")
    return dist.TCPStore(host, int(port), info.world_size, is_master=info.rank == 0, timeout=timeout)


def worker_main(info: RankInfo, started: Connection | None = None) -> None:
    """Entry point of a worker process (ranks 1..N-1): serve steps until SHUTDOWN, the parent's death or an error."""
    logging.basicConfig(level=logging.WARNING)
    _exit_with_parent()
    store = rank = None
    try:
        if started is not None:
            started.send(b"started")
            started.close()
        store = open_store(info)
        init = msgspec.msgpack.decode(store.get(INIT_KEY), type=WorkerInit)
        if init.device_type == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(info.local_world_size))
        rank = Rank(info, init, store)
        decoder = msgspec.msgpack.Decoder(SchedulerOutput)
        while True:
            message = broadcast_bytes(None, rank.control)
            if message == SHUTDOWN:
                break
            if message != NOOP:
                rank.runner.launch(decoder.decode(message))  # rank 0's output is the answer; this one is dropped
    except BaseException:
        _report(store, info.rank, traceback.format_exc())
        os._exit(1)  # skip destructors: peers may already be gone
    rank.close()


def cpu_threads_per_rank(local_world_size: int) -> int:
    """Torch threads for one rank when all of a node's ranks share its CPU cores."""
    return max(1, len(os.sched_getaffinity(0)) // local_world_size)


def _report(store: dist.Store | None, rank: int, text: str) -> None:
    sys.stderr.write(f"omnistream tensor-parallel rank {rank} failed:\n{text}")
    if store is not None:
        try:
            store.set_timeout(timedelta(seconds=5))
            store.set(ERROR_KEY.format(rank=rank), text.encode())
        except Exception:  # the store's host (rank 0) may be gone; stderr has the report
            pass


def _exit_with_parent() -> None:
    """Exit as soon as the process that spawned this one dies (its sentinel pipe closes)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="omnistream-parent-watch", daemon=True).start()


class _gloo_on_loopback:
    """Set GLOO_SOCKET_IFNAME to the loopback interface while groups are created (unless the user chose one)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and "GLOO_SOCKET_IFNAME" not in os.environ
        self.interface = "lo0" if sys.platform == "darwin" else "lo"

    def __enter__(self) -> None:
        if self.enabled:
            os.environ["GLOO_SOCKET_IFNAME"] = self.interface

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)


@dataclasses.dataclass(frozen=True)
class Topology:
    """How N ranks spread over nodes, from the standard variables NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT."""

    world_size: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, world_size: int) -> Topology:
        nnodes, node_rank = int(os.environ.get("NNODES", "1")), int(os.environ.get("NODE_RANK", "0"))
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise ValueError(f"NODE_RANK must be in [0, NNODES); got NODE_RANK={node_rank}, NNODES={nnodes}")
        if world_size % nnodes:
            raise ValueError(f"tensor_parallel_size {world_size} is not divisible by NNODES={nnodes}")
        if nnodes > 1 and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
            raise ValueError("a multi-node run (NNODES > 1) needs MASTER_ADDR and MASTER_PORT (node 0's address)")
        return cls(world_size, nnodes, node_rank, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                   int(os.environ.get("MASTER_PORT", "0")))

    @property
    def local_world_size(self) -> int:
        return self.world_size // self.nnodes

    def rank_info(self, local_rank: int, store: str, timeout_s: float) -> RankInfo:
        return RankInfo(rank=self.node_rank * self.local_world_size + local_rank, world_size=self.world_size,
                        local_rank=local_rank, local_world_size=self.local_world_size, store=store,
                        timeout_s=timeout_s, loopback=self.nnodes == 1)


def main(argv: list[str] | None = None) -> int:
    """Start this node's ranks of a multi-node engine (node 0 runs the engine itself) and wait for them."""
    parser = argparse.ArgumentParser(prog="python -m omnistream.engine.worker.tp_worker", description=main.__doc__)
    parser.add_argument("--tensor-parallel-size", type=int, required=True, help="ranks over all nodes")
    parser.add_argument("--distributed-timeout-s", type=float, default=EngineConfig.distributed_timeout_s)
    args = parser.parse_args(argv)
    topology = Topology.from_env(args.tensor_parallel_size)
    if topology.node_rank == 0:
        parser.error("NODE_RANK 0 is the engine's node: start the engine there (LLM(tensor_parallel_size=N))")
    store = f"tcp://{topology.master_addr}:{topology.master_port}"
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=worker_main, args=(topology.rank_info(i, store, args.distributed_timeout_s),),
                             name=f"omnistream-tp-rank-{topology.node_rank * topology.local_world_size + i}",
                             daemon=True)
             for i in range(topology.local_world_size)]
    for proc in procs:
        proc.start()
    pending = {proc.sentinel: proc for proc in procs}
    while pending:  # one rank failing ends the node: the engine is dead anyway
        for sentinel in multiprocessing.connection.wait(list(pending)):
            proc = pending.pop(sentinel)
            proc.join()
            if proc.exitcode:
                for other in pending.values():
                    other.kill()
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
