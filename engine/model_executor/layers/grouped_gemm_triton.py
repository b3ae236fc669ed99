"""Our Triton grouped GEMM: expert-sorted rows in blocks padded per expert, launched with no host sync.

Needs triton (CUDA wheels of torch bring it); `grouped_gemm.py` imports this module only where it runs it.
The rows are block-aligned on the device (`grouped_gemm_align.py`); the launch covers the static bound of
padded blocks and every program past the padded total (a device scalar it reads) returns at once. Each
program computes one [BLOCK_M, BLOCK_N] tile of one expert, accumulating in fp32: fp32 operands multiply in
IEEE fp32 (Triton's default for fp32 `tl.dot` is TF32), bf16/fp16 at the backend's default. Pad slots hold
a sentinel row id and are masked on load and store. Triton reads TRITON_INTERPRET when `@triton.jit` runs,
i.e. when this module is imported: set it before the import to run the kernel on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omnistream.engine.model_executor.layers.grouped_gemm_align import align_to_blocks

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit(do_not_specialize=["num_rows"])  # it changes every step: one compiled kernel for all
def _grouped_gemm_kernel(
    x_ptr, w_ptr, out_ptr, row_ids_ptr, block_experts_ptr, padded_rows_ptr,
    num_rows, n, k,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    block_m = tl.program_id(0)
    if block_m * BLOCK_M >= tl.load(padded_rows_ptr):
        return
    expert = tl.load(block_experts_ptr + block_m).to(tl.int64)
    rows = tl.load(row_ids_ptr + block_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_rows
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n
    x_rows = x_ptr + rows[:, None] * stride_xm
    w_cols = w_ptr + expert * stride_we + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        inner = start + tl.arange(0, BLOCK_K)
        in_k = inner < k
        a = tl.load(x_rows + inner[None, :] * stride_xk, mask=row_mask[:, None] & in_k[None, :], other=0.0)
        b = tl.load(w_cols + inner[:, None] * stride_wk, mask=in_k[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def block_sizes(num_rows: int, num_experts: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) from host ints: BLOCK_M the smallest of 16/32/64 that holds an expert's
    average share of the rows (few rows per expert waste little on padding), BLOCK_K 32 in fp32, 64 else."""
    per_expert = -(-num_rows // max(1, num_experts))
    block_m = next((size for size in (16, 32) if per_expert <= size), 64)
    return block_m, 64, 32 if dtype == torch.float32 else 64


def grouped_gemm_triton(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [M, K] rows sorted by group, w [E, N, K], offs [E] group ends (offs[-1] == M) -> [M, N] in x's dtype:
    out[rows of group e] = x[rows of group e] @ w[e].T, without reading `offs` on the host."""
    if x.dtype not in KERNEL_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"the Triton grouped GEMM takes one of {KERNEL_DTYPES} on both sides, "
                        f"got {x.dtype} and {w.dtype}")
    num_rows, k = x.shape
    num_experts, n, _ = w.shape
    out = x.new_empty(num_rows, n)
    if num_rows == 0 or n == 0:
        return out
    block_m, block_n, block_k = block_sizes(num_rows, num_experts, x.dtype)
    aligned = align_to_blocks(offs, num_rows, block_m)
    grid = (aligned.block_experts.shape[0], triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        x, w, out, aligned.row_ids, aligned.block_experts, aligned.padded_rows,
        num_rows, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # None: the backend's default
    )
    return out
