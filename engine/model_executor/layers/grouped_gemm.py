"""The grouped GEMM of the MoE: rows sorted by expert, each group times its own expert's weight.

`grouped_gemm(x, w, offs)` is a torch custom op, `omnistream::grouped_gemm` (called without the dispatcher in
eager mode: eager_ops.py), with a fake (shape-only) kernel, so that meta-device runs and `torch.compile` see only
its shape (torch's own meta kernel for `_grouped_mm` accepts bf16 alone). Its real kernel, by device:
- CUDA: `torch._grouped_mm` for bf16 on capability 9.x/10.x (torch's CUTLASS path, which keeps `offs` on
  the device); elsewhere (fp32 parity runs, fp16, older or newer GPUs, ROCm) `_grouped_mm` would read `offs`
  on the host, so our Triton kernel (`grouped_gemm_triton.py`, imported only here and only when triton is
  installed) runs instead; without triton, `grouped_gemm_loop`.
- CPU and other devices: `torch._grouped_mm` when the operands allow it, else `grouped_gemm_loop`, the
  per-expert loop that is also the reference in tests. On CPU both run one `mm` per expert on the same rows,
  so they agree bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.eager_ops import eager_op

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_gemm_loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[rows of group e] = x[rows of group e] @ w[e].T; the groups end at `offs` [E] (cumulative counts).

    The slow, obviously correct twin: it reads `offs` on the host, so it syncs with the device.
    """
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], w[expert])
        start = end
    return out


def _aligned(t: torch.Tensor, height: int, width: int, rows: int, cols: int) -> bool:
    """Whether a [height, width] matrix in `t`'s storage with strides (rows, cols) is column- or row-major
    with a 16-byte aligned leading stride and, off the CPU, a 16-byte aligned start (`_grouped_mm`'s rule)."""
    if rows == 1 and cols >= max(1, height):
        leading = cols
    elif cols == 1 and rows >= max(1, width):
        leading = rows
    else:
        return False
    return leading * t.element_size() % 16 == 0 and (t.device.type == "cpu" or t.data_ptr() % 16 == 0)


def fits_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)` is allowed: one of its dtypes on both
    sides, int32 offsets, and 16-byte aligned strides on both operands."""
    return (
        x.dtype in _GROUPED_MM_DTYPES
        and w.dtype == x.dtype
        and offs.dtype == torch.int32
        and x.dim() == 2
        and w.dim() == 3
        and _aligned(x, x.shape[0], x.shape[1], x.stride(0), x.stride(1))
        and _aligned(w, w.shape[2], w.shape[1], w.stride(2), w.stride(1))  # w[e].T: [K, N]
    )


@functools.cache
def triton_installed() -> bool:
    """Whether triton can be imported (it ships with CUDA builds of torch; it is optional)."""
    return importlib.util.find_spec("triton") is not None


def grouped_mm_keeps_offsets_on_device(x: torch.Tensor) -> bool:
    """Whether CUDA's `_grouped_mm` takes its sync-free CUTLASS path for `x`: bf16 on an SM90/SM100 GPU."""
    return (
        x.dtype == torch.bfloat16
        and torch.version.hip is None
        and torch.cuda.get_device_capability(x.device)[0] in (9, 10)
    )


def _grouped_gemm_cuda(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if grouped_mm_keeps_offsets_on_device(x) and fits_grouped_mm(x, w, offs):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).contiguous()
    if triton_installed() and x.dtype in _GROUPED_MM_DTYPES and w.dtype == x.dtype:
        from omnistream.engine.model_executor.layers.grouped_gemm_triton import grouped_gemm_triton

        return grouped_gemm_triton(x, w, offs)
    return grouped_gemm_loop(x, w, offs)


@eager_op("omnistream::grouped_gemm")
def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] rows sorted by group, w [E, N, K], offs [E] int32 group ends (offs[-1] == M) -> [M, N]:
    out[rows of group e] = x[rows of group e] @ w[e].T. The module docstring says which kernel runs."""
    if x.device.type == "cuda":
        return _grouped_gemm_cuda(x, w, offs)
    if fits_grouped_mm(x, w, offs):
        # Its output rows are padded to 16 bytes; the fake promises a contiguous result.
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).contiguous()
    return grouped_gemm_loop(x, w, offs)


@grouped_gemm.register_fake
def _grouped_gemm_fake(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])
