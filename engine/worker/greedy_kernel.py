"""The compiled greedy lm_head (greedy_kernel.c): each row's largest logit and its id over one vocabulary shard,
without materialising the logits; built on first use with the system C compiler, cached, called through ctypes.

Given a packed mask of allowed tokens per row (int32 words, bit t & 31 of word t >> 5, as llguidance writes them),
only the allowed ids compete: the first maximum of the masked logits, exact, in one pass (greedy structured output).
`greedy_top` gives each row's best `k` ids in order instead (same pass, same logits): the first of them that a
grammar allows is that row's masked maximum, when one is (structured output checks them before it fills a mask).

CPU only, float32 or bfloat16 weights (a bf16 lm_head's logits are rounded to bf16 before they are compared, as
torch's are). It runs on torch.get_num_threads() threads of the OpenMP runtime torch itself loaded. Without a
working compiler, or with OMNISTREAM_GREEDY_KERNEL=0, `load_kernel` returns None and greedy_head.py keeps its
torch path (the slow twin the tests compare this kernel with).
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from functools import cache
from pathlib import Path

import torch

from omnistream.engine.model_executor import huge_pages
from omnistream.multimodal.native_build import build_shared_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("greedy_kernel.c")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
TOP_K_MAX = 64  # greedy_kernel.c's TOP_K_MAX
DISABLE_ENV = "OMNISTREAM_GREEDY_KERNEL"  # "0": never build or use the kernel
_ARGTYPES = [
    ctypes.c_void_p,  # hidden
    ctypes.c_int64,  # rows
    ctypes.c_int64,  # hidden size
    ctypes.c_void_p,  # weight
    ctypes.c_int64,  # vocabulary rows
    ctypes.c_int64,  # weight row stride
    ctypes.c_int,  # bf16 weight
    ctypes.c_int,  # round logits to bf16
    ctypes.c_int,  # prefetch weight rows
    ctypes.c_void_p,  # allowed-token mask (or NULL)
    ctypes.c_int64,  # its words per row
    ctypes.c_int,  # top-k (0: the best id per row)
    ctypes.c_int64,  # the batch size that picks the kernel's loop (0: the rows')
    ctypes.c_void_p,  # out values
    ctypes.c_void_p,  # out ids
    ctypes.c_int,  # threads
]


@cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it is switched off or cannot be built (logged once)."""
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    try:
        library = ctypes.CDLL(str(build_shared_library(SOURCE, ("-fopenmp",))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("greedy lm_head: the cpu kernel could not be built (%s); the torch path is used", exc)
        return None
    library.greedy_lm_head.restype = ctypes.c_int
    library.greedy_lm_head.argtypes = _ARGTYPES
    return library


def supports(weight: torch.Tensor, hidden_dtype: torch.dtype) -> bool:
    """Whether the kernel is built and takes this lm_head weight [V, H] with hidden rows of hidden_dtype."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in WEIGHT_DTYPES
        and hidden_dtype == weight.dtype
        and weight.dim() == 2
        and weight.stride(1) == 1
        and load_kernel() is not None
    )


def greedy_max(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    allowed: torch.Tensor | None = None,
    prefetch: bool | None = None,
    as_batch_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest logit of each row of hidden [B, H] against weight [V, H] and its id (first maximum): values in
    hidden's dtype [B], ids int64 [B]. With `allowed` (int32 [B, W], W * 32 >= V: row b may take id t when bit
    t & 31 of allowed[b, t >> 5] is set) only allowed ids compete; a row allowing none gets id 0 and value -inf.
    `prefetch` (None: unless the weight lies on huge pages, where it measured no better) asks the kernel to prefetch
    weight rows ahead of its scan. `as_batch_of`: compute each row's logits as in a batch of that many rows (the
    kernel's loop, hence the sums' rounding, depends on the batch size). Call only where `supports(weight,
    hidden.dtype)` holds."""
    rows = hidden.float().contiguous()
    mask_ptr, mask_words = None, 0
    if allowed is not None:
        if allowed.dtype != torch.int32 or allowed.shape[0] != rows.shape[0] or allowed.shape[1] * 32 < weight.shape[0]:
            raise ValueError(
                f"greedy lm_head: the mask must be int32 [{rows.shape[0]}, >= {-(-weight.shape[0] // 32)}] words, "
                f"not {allowed.dtype} {list(allowed.shape)}"
            )
        allowed = allowed.contiguous()
        mask_ptr, mask_words = allowed.data_ptr(), allowed.shape[1]
    values, ids = _run(weight, rows, mask_ptr, mask_words, 0, as_batch_of, prefetch)
    return values.to(hidden.dtype), ids


def greedy_top(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    k: int,
    prefetch: bool | None = None,
    as_batch_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row of hidden [B, H] against weight [V, H] and their ids, in the order (value
    descending, id ascending): float32 [B, k], int64 [B, k]; the first column is greedy_max's. A slot no finite
    logit filled has value -inf and id -1. 1 <= k <= TOP_K_MAX; `prefetch` and `as_batch_of` as in greedy_max."""
    if not 1 <= k <= TOP_K_MAX:
        raise ValueError(f"greedy lm_head: top-k must be in [1, {TOP_K_MAX}], not {k}")
    values, ids = _run(weight, hidden.float().contiguous(), None, 0, k, as_batch_of, prefetch)
    return values.view(-1, k), ids.view(-1, k)


def _run(
    weight: torch.Tensor,
    rows: torch.Tensor,
    mask_ptr: int | None,
    mask_words: int,
    top_k: int,
    as_batch_of: int | None,
    prefetch: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    library = load_kernel()
    if library is None:
        raise RuntimeError("greedy lm_head: the cpu kernel is not available")
    values = torch.empty(rows.shape[0] * max(top_k, 1), dtype=torch.float32)
    ids = torch.empty(rows.shape[0] * max(top_k, 1), dtype=torch.int64)
    bf16 = int(weight.dtype == torch.bfloat16)
    status = library.greedy_lm_head(
        rows.data_ptr(),
        rows.shape[0],
        rows.shape[1],
        weight.data_ptr(),
        weight.shape[0],
        weight.stride(0),
        bf16,
        bf16,
        int(not huge_pages.holds(weight) if prefetch is None else prefetch),
        mask_ptr,
        mask_words,
        top_k,
        as_batch_of or 0,
        values.data_ptr(),
        ids.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("greedy lm_head: the cpu kernel could not allocate its scratch memory")
    return values, ids
