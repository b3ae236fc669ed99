"""EngineConfig: the engine's knobs (model, dtype, batch limits, KV cache size), validated once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "reference", "cpu", "triton")  # engine/model_executor/attention/selector.py resolves them
_DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint directory; None = the embedded default model
    dtype: str = "auto"  # auto = the checkpoint's dtype
    device: str | None = None  # None = cuda when available, else cpu
    max_model_len: int | None = None  # None = the model's max_position_embeddings, capped by the KV cache
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # wins over kv_cache_memory
    kv_cache_memory: int | None = None  # bytes; None = 2 GiB on CPU, 90% of free memory on CUDA
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks (one per device); > 1 spawns worker processes (see engine/worker/executor.py)
    distributed_timeout_s: float = 300.0  # a collective or worker start that takes longer ends the engine
    # torch CPU threads of the engine; None: torch's default (all cores), or all but one when the engine core
    # runs in its own process beside a serving front end (which needs a core of its own)
    cpu_threads: int | None = None
    attention_backend: str = "auto"  # auto = the fastest that works on the device (triton on CUDA, cpu on CPU)
    enforce_eager: bool = False  # never replay CUDA graphs for decode steps (graphs are off on CPU regardless)
    # schedule and prepare step N+1 while step N runs (engine/core/steps.py); None: on for CUDA, off on CPU
    async_scheduling: bool | None = None
    # the speech lane (talker, code predictor, code2wav), loaded when the checkpoint has one; TP=1 only in v1
    enable_speech: bool = True
    max_num_voices: int = 8  # requests speaking at once (each holds a code2wav stream)
    num_talker_kv_blocks: int | None = None  # None: room for max_num_voices answers of max_audio_frames frames
    max_audio_frames: int = 4096  # frames (80 ms each) per spoken answer, as HF's talker limit
    # frames in a voice's first audio packet: 1 = first audio one step after the first text token; 2 = one step
    # later, with 137 ms of audio instead of 57 ms for a client that plays at once (fewer underruns)
    speech_first_packet_frames: int = 1

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if not self.distributed_timeout_s > 0:
            raise ValueError(f"distributed_timeout_s must be positive, got {self.distributed_timeout_s}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be positive, got {self.cpu_threads}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; "
                             f"got {self.attention_backend!r}")
        for name in ("max_num_voices", "max_audio_frames", "speech_first_packet_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_talker_kv_blocks is not None and self.num_talker_kv_blocks < 1:
            raise ValueError(f"num_talker_kv_blocks must be positive, got {self.num_talker_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    def talker_kv_blocks(self) -> int:
        """Talker KV blocks: as set, or each voice's answer plus a 1024-row prompt."""
        if self.num_talker_kv_blocks is not None:
            return self.num_talker_kv_blocks
        return self.max_num_voices * -(-(self.max_audio_frames + 1024) // self.block_size)

    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def overlaps_steps(self) -> bool:
        """Whether the engine core runs overlapped steps (async_scheduling, resolved for the device)."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.torch_device().type == "cuda"

    def kv_cache_bytes(self, device: torch.device) -> int:
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.9)
        return _DEFAULT_CPU_KV_CACHE_BYTES
