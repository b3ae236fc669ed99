"""The `cpu` attention backend: one call per layer of the compiled kernel (cpu_kernel.c) over the flat batch,
reading K/V pages in place; built on first use with the system C compiler, cached, called through ctypes.

Prefill chunks of at least FLASH_MIN_QUERIES queries go to torch's fused CPU flash kernel instead (cpu_flash, also
reading the pages in place), which is faster there (benchmarks/attention.py). The kernel reads float32 or bfloat16
caches (float16 is refused: select `reference`); queries are read as float32 and the output is returned in the
query's dtype. It runs on torch.get_num_threads() threads of the OpenMP runtime torch itself loaded. Without a
working compiler `load_kernel` returns None (logged once) and the engine falls back to `reference`. The op is a
torch custom op with a fake implementation (shape-only), for meta runs and compile, called without the dispatcher
in eager mode (eager_ops.py).
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from functools import cache
from pathlib import Path

import numpy as np
import torch

from omnistream.engine.model_executor.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    check_kernel_shapes,
    write_kv_cache,
)
from omnistream.engine.model_executor.attention.cpu_flash import attend_paged, attend_request
from omnistream.engine.model_executor.attention.kv_views import block_runs
from omnistream.engine.model_executor.eager_ops import eager_op
from omnistream.multimodal.native_build import build_shared_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.c")
CACHE_DTYPES = (torch.float32, torch.bfloat16)
MAX_HEAD_DIM = 256  # the kernel's per-row buffers
FLASH_MIN_QUERIES = 32  # a request with this many new queries or more is attended by torch's flash kernel
# threading of the compiled kernel: OpenMP (the default), threads started per call, or the calling thread only
VARIANTS = {
    "openmp": ("-fopenmp",),
    "pthreads": ("-fopenmp-simd", "-pthread", "-DATTN_PTHREADS"),
    "serial": ("-fopenmp-simd", "-DATTN_SERIAL"),
}
_ARGTYPES = [
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # q .. block_size
    ctypes.c_int, ctypes.c_int, ctypes.c_int,  # num_heads, num_kv_heads, head_dim
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,  # metadata, num_reqs
    ctypes.c_float, ctypes.c_void_p, ctypes.c_int,  # scale, out, num_threads
]


@cache
def load_kernel(variant: str = "openmp") -> ctypes.CDLL | None:
    """The compiled kernel of this threading variant, or None when it cannot be built (logged once)."""
    try:
        library = ctypes.CDLL(str(build_shared_library(SOURCE, VARIANTS[variant])))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("attention: the cpu kernel could not be built (%s); the reference backend is used", exc)
        return None
    library.attention_cpu.restype = ctypes.c_int
    library.attention_cpu.argtypes = _ARGTYPES
    return library


def run_kernel(
    library: ctypes.CDLL,
    query: torch.Tensor,  # [T, num_heads, head_dim] float32, unit stride in heads and dims
    kv_cache: torch.Tensor,  # contiguous
    query_start_loc: np.ndarray,  # int32, contiguous, like seq_lens and block_table
    seq_lens: np.ndarray,
    block_table: np.ndarray,
    scale: float,
    out: torch.Tensor,  # [T, num_heads, head_dim] float32, contiguous
    num_threads: int,
) -> None:
    """One kernel call over requests 0 .. len(seq_lens) - 1 (rows of the flat batch in query_start_loc)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    status = library.attention_cpu(
        query.data_ptr(), query.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(),
        int(kv_cache.dtype == torch.bfloat16), kv_cache.shape[2], num_heads, kv_cache.shape[3], head_dim,
        query_start_loc.ctypes.data, seq_lens.ctypes.data, block_table.ctypes.data, block_table.shape[1],
        len(seq_lens), scale, out.data_ptr(), num_threads,
    )
    if status != 0:
        raise MemoryError("attention: the cpu kernel could not allocate its work list")


def check_supported(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """Raise ValueError naming what the kernel cannot do (then select the `reference` backend)."""
    check_kernel_shapes("cpu", CACHE_DTYPES, MAX_HEAD_DIM, num_heads, num_kv_heads, head_dim, dtype)


@eager_op("omnistream::attention_cpu")
def attention_cpu(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of `query` over the cache (this step's keys already written). Given this step's `key`/`value`,
    long chunks take their own keys and values from them instead of reading them back from their slots."""
    library = load_kernel()
    if library is None:
        raise RuntimeError("attention: the cpu kernel is not available")
    check_supported(query.shape[1], kv_cache.shape[3], query.shape[2], kv_cache.dtype)
    q = query.float()
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    if not kv_cache.is_contiguous():
        raise ValueError("attention: the cpu kernel needs a contiguous KV cache")
    starts, lens, table = (np.ascontiguousarray(t.numpy(), dtype=np.int32)
                           for t in (query_start_loc, seq_lens, block_table))
    long_chunks = np.flatnonzero((np.diff(starts) >= FLASH_MIN_QUERIES) & (lens > 0))
    kernel_lens = lens
    if len(long_chunks):
        kernel_lens = lens.copy()
        kernel_lens[long_chunks] = 0  # the kernel writes zeros there; the flash kernel fills them below
    out = torch.empty(query.shape, dtype=torch.float32)
    run_kernel(library, q, kv_cache, starts, kernel_lens, table, scale, out, torch.get_num_threads())
    block_size = kv_cache.shape[2]
    for i in long_chunks.tolist():
        start, end, seq_len = int(starts[i]), int(starts[i + 1]), int(lens[i])
        pages = table[i, : -(-seq_len // block_size)].tolist()
        if key is None or value is None:
            out[start:end] = attend_paged(query[start:end], kv_cache, pages, seq_len, scale)
        else:
            runs = block_runs(pages)
            out[start:end] = attend_request(
                query[start:end], key[start:end], value[start:end], kv_cache, runs, seq_len, scale
            )
    return out.to(query.dtype)


@attention_cpu.register_fake
def _(query, kv_cache, query_start_loc, seq_lens, block_table, scale, key=None, value=None):
    return torch.empty_like(query)


class CpuBackend(AttentionBackend):
    name = "cpu"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """As AttentionBackend.forward, but long chunks attend to this step's keys and values as given, which
        saves gathering them back from their slots."""
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        return attention_cpu(
            query, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table, scale, key, value
        )

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        return attention_cpu(
            query, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table, scale
        )
