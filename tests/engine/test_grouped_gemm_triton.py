"""Our Triton grouped GEMM equals the per-expert loop twin of `omnistream::grouped_gemm`.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors: fp32 within 1e-5
relative, fp16 close, for 8/16 experts, top-2/8, 1/7/64 tokens, experts with no rows (first, inside, last),
ragged and strided operands. Its block alignment is exact and reads nothing on the host (it runs on `meta`).
The op's module imports and runs without triton. On CUDA (skipped here) the op takes `_grouped_mm` or the
kernel as its docstring says, both agree with the loop, and neither syncs with the host.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from omnistream.engine.model_executor.layers import grouped_gemm as op
from omnistream.engine.model_executor.layers.grouped_gemm import grouped_gemm, grouped_gemm_loop
from omnistream.engine.model_executor.layers.grouped_gemm_align import align_to_blocks, max_blocks

KERNEL_MODULE = "omnistream.engine.model_executor.layers.grouped_gemm_triton"


def offsets(counts: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


def expected_alignment(counts: list[int], block_m: int) -> tuple[list[int], list[int], int]:
    """The padded layout written out by hand: each group's rows, then sentinels up to a whole block."""
    num_rows, row_ids, block_experts, start = sum(counts), [], [], 0
    for expert, count in enumerate(counts):
        blocks = -(-count // block_m)
        row_ids += list(range(start, start + count)) + [num_rows] * (blocks * block_m - count)
        block_experts += [expert] * blocks
        start += count
    return row_ids, block_experts, len(row_ids)


@pytest.mark.parametrize("block_m", [16, 32])
@pytest.mark.parametrize(
    "counts", [[5], [0, 3, 0, 17, 1, 0], [16, 0, 32, 33], [0, 0, 0, 2], [4, 0, 0, 0]],
    ids=["one-group", "empty-first-inside-last", "whole-blocks", "only-last", "only-first"])
def test_alignment_pads_each_group_to_whole_blocks_and_points_pad_slots_at_the_sentinel(counts, block_m):
    num_rows, num_experts = sum(counts), len(counts)
    aligned = align_to_blocks(offsets(counts), num_rows, block_m)
    row_ids, block_experts, padded = expected_alignment(counts, block_m)
    num_blocks = max_blocks(num_rows, num_experts, block_m)
    assert aligned.padded_rows.tolist() == [padded]
    assert aligned.row_ids.tolist() == row_ids + [num_rows] * (num_blocks * block_m - padded)
    assert aligned.block_experts.tolist() == block_experts + [num_experts] * (num_blocks - len(block_experts))
    assert aligned.row_ids.dtype == aligned.block_experts.dtype == aligned.padded_rows.dtype == torch.int32


def test_alignment_buffers_have_the_static_size_and_one_row_per_expert_fills_them():
    num_experts, block_m = 8, 16
    sizes = set()
    for counts in ([8, 0, 0, 0, 0, 0, 0, 0], [1] * 8, [0, 2, 2, 0, 1, 0, 3, 0]):
        aligned = align_to_blocks(offsets(counts), 8, block_m)
        sizes.add((aligned.row_ids.shape[0], aligned.block_experts.shape[0]))
    assert sizes == {(num_experts * block_m, num_experts)}  # (8 + 8 * 15) // 16 blocks, whatever the routing
    assert align_to_blocks(offsets([1] * 8), 8, block_m).padded_rows.tolist() == [num_experts * block_m]


def test_alignment_runs_on_meta_so_it_never_reads_the_routing_on_the_host():
    offs = torch.empty(16, dtype=torch.int32, device="meta")
    aligned = align_to_blocks(offs, 37, 16)
    num_blocks = max_blocks(37, 16, 16)
    assert all(t.device.type == "meta" for t in aligned)
    assert aligned.row_ids.shape == (num_blocks * 16,) and aligned.block_experts.shape == (num_blocks,)
    assert aligned.padded_rows.shape == (1,)


@pytest.mark.parametrize("arch, dtype, fast", [
    ((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, True), ((8, 0), torch.bfloat16, False),
    ((12, 0), torch.bfloat16, False), ((9, 0), torch.float32, False), ((9, 0), torch.float16, False),
])
def test_grouped_mm_is_taken_on_cuda_only_where_it_keeps_offsets_on_the_device(
        monkeypatch, arch, dtype, fast):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: arch)
    monkeypatch.setattr(torch.version, "hip", None)
    assert op.grouped_mm_keeps_offsets_on_device(torch.zeros(1, dtype=dtype)) == fast


def test_the_op_module_imports_and_runs_the_moe_block_on_cpu_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now fails
        import torch
        from omnistream.engine.model_executor.layers import grouped_gemm as op
        from omnistream.engine.model_executor.layers.moe import SparseMoeBlock
        assert not op.triton_installed()
        x, w, offs = torch.randn(10, 32), torch.randn(3, 24, 32), torch.tensor([4, 4, 10], dtype=torch.int32)
        assert torch.equal(op.grouped_gemm(x, w, offs), op.grouped_gemm_loop(x, w, offs))
        block = SparseMoeBlock(32, 16, 8, 2, True)
        for param in block.parameters():
            param.data.normal_(0, 0.2)
        with torch.no_grad():
            assert torch.isfinite(block(torch.randn(5, 32))).all()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr


def routed_offsets(num_tokens: int, num_experts: int, top_k: int,
                   avoid: tuple[int, ...] = ()) -> torch.Tensor:
    """Group ends of T*k rows routed as a MoE routes them: k distinct experts per token, none of `avoid`."""
    scores = torch.rand(num_tokens, num_experts)
    scores[:, list(avoid)] = -1.0
    experts = scores.topk(top_k, dim=-1).indices.flatten()
    counts = torch.zeros(num_experts, dtype=torch.int64).scatter_add_(0, experts, torch.ones_like(experts))
    return counts.cumsum(0).to(torch.int32)


def interpreter_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, w, offs) by name. K = 40 and N = 72 leave ragged last tiles (BLOCK_K 32/64, BLOCK_N 64)."""
    torch.manual_seed(0)
    cases = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        for experts, top_k in ((8, 2), (8, 8), (16, 2), (16, 8)):
            for tokens in (1, 7, 64):
                cases[f"routed-{dtype_name}-E{experts}-k{top_k}-T{tokens}"] = (
                    torch.randn(tokens * top_k, 40).to(dtype), torch.randn(experts, 72, 40).to(dtype),
                    routed_offsets(tokens, experts, top_k))
        for name, counts in (("first-inside-last", [0, 5, 0, 0, 16, 17, 0]), ("all-but-last", [0, 0, 3]),
                             ("all-but-first", [9, 0, 0]), ("one-over-two-blocks", [0, 33, 0])):
            cases[f"empty-{dtype_name}-{name}"] = (
                torch.randn(sum(counts), 40).to(dtype), torch.randn(len(counts), 24, 40).to(dtype),
                offsets(counts))
        cases[f"empty-{dtype_name}-routed-away-from-0-and-15"] = (
            torch.randn(14, 40).to(dtype), torch.randn(16, 72, 40).to(dtype),
            routed_offsets(7, 16, 2, (0, 15)))
    cases["strided-x-column-major-w-column-major-sliced"] = (
        torch.randn(40, 16).t(), torch.randn(3, 40, 30).transpose(1, 2)[:, :24], offsets([6, 0, 10]))
    return cases


CASES = interpreter_cases()


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The kernel's output for every case, from one interpreter run in a fresh process (its worker says
    why a fresh one)."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("interpreted")
    torch.save(CASES, folder / "cases.pt")
    worker = Path(__file__).with_name("interpreted_grouped_gemm.py")
    done = subprocess.run([sys.executable, str(worker), str(folder / "cases.pt"), str(folder / "out.pt")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return torch.load(folder / "out.pt")


def assert_equals_loop(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> None:
    want = grouped_gemm_loop(x, w, offs)
    assert got.dtype == want.dtype and got.shape == want.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=1e-3 * want.abs().max().item())


def named(prefix: str) -> list[str]:
    return [name for name in CASES if name.startswith(prefix)]


@pytest.mark.parametrize("case", named("routed-"))
def test_interpreted_kernel_equals_the_loop_twin_for_routed_rows(interpreted, case):
    assert_equals_loop(interpreted[case], *CASES[case])


@pytest.mark.parametrize("case", named("empty-"))
def test_interpreted_kernel_is_right_around_experts_without_rows(interpreted, case):
    x, w, offs = CASES[case]
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    assert (counts == 0).any()
    assert_equals_loop(interpreted[case], x, w, offs)


def test_interpreted_kernel_reads_transposed_and_sliced_operands(interpreted):
    case = "strided-x-column-major-w-column-major-sliced"
    x, w, _ = CASES[case]
    assert x.stride(0) == 1 and w.stride(1) == 1 and not w.is_contiguous()
    assert_equals_loop(interpreted[case], *CASES[case])


def test_the_kernel_gives_an_empty_output_for_no_rows_without_a_launch():
    kernel = pytest.importorskip(KERNEL_MODULE)
    got = kernel.grouped_gemm_triton(torch.randn(0, 40), torch.randn(4, 24, 40), offsets([0, 0, 0, 0]))
    assert got.shape == (0, 24)


def test_the_kernel_refuses_dtypes_it_has_no_dot_for():
    kernel = pytest.importorskip(KERNEL_MODULE)
    with pytest.raises(TypeError, match="Triton grouped GEMM"):
        kernel.grouped_gemm_triton(torch.randn(4, 8).double(), torch.randn(2, 8, 8).double(), offsets([2, 2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("num_tokens", [1, 64, 300])
def test_on_cuda_the_op_kernel_and_grouped_mm_agree_with_the_loop_without_a_host_sync(dtype, num_tokens):
    grouped_gemm_triton = pytest.importorskip(KERNEL_MODULE).grouped_gemm_triton
    torch.manual_seed(num_tokens)
    offs = routed_offsets(num_tokens, 16, 8, avoid=(0, 15)).cuda()
    x = torch.randn(num_tokens * 8, 256, device="cuda").to(dtype)
    w = (torch.randn(16, 384, 256, device="cuda") / 16).to(dtype)
    want = grouped_gemm_loop(x.double(), w.double(), offs).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    sync_free = op.grouped_mm_keeps_offsets_on_device(x) or op.triton_installed()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error" if sync_free else "default")
    try:
        got = grouped_gemm(x, w, offs)
        kernel = grouped_gemm_triton(x, w, offs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(kernel, want, **tol)
    torch.testing.assert_close(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs), want, **tol)
