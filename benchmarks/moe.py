"""Time the sparse MoE block's forward: the sync-free grouped-GEMM path against the expert loop it replaced.

Variants, run interleaved on the same weights and inputs (so background load hits them alike):
- `loop`: the previous forward, kept here as the baseline: `bincount(...).tolist()` (a host sync), one pair of
  `F.linear` per expert that received tokens, one `index_add_` of all weighted outputs.
- `grouped`: `SparseMoeBlock.forward` as it is (routing on the device, `omnistream::grouped_gemm`).
- `grouped-loop`: the same forward with the grouped GEMM replaced by its per-expert loop twin, to separate the
  GEMMs from the routing and accumulation around them.
Shapes: `tiny` is the embedded default model's (hidden 128, expert width 128, 8 experts top-2); `real` the
Qwen3-Omni-30B-A3B thinker's (hidden 2048, expert width 768, 128 experts top-8). Each of `--layers` layers has
its own random weights and the calls cycle through them, so one layer's weights are not left warm in cache for
the next call. A timed sample repeats the calls for at least ~50 ms; the table gives the median over
`--repeats` samples of the wall time per layer call and each variant's ratio to `loop`.
Example (a few minutes on one core; the real shapes hold 2.4 GB per fp32 layer):
    python benchmarks/moe.py --threads 1 --tokens 1,16,64,256 --shapes tiny,real --dtypes fp32,bf16

`--device cuda` (needs a CUDA GPU) times the grouped GEMM pair of one layer instead (x @ W13 then the
expert-width input @ W2, at the chosen shapes) three ways: `triton` (our kernel), `grouped_mm`
(`torch._grouped_mm`: sync-free for bf16 on SM90/SM100, a host loop elsewhere) and `loop` (the per-expert
loop twin), after checking they agree. `--routings` different random routings per token count are cycled so
the touched experts are not left in L2; CUDA events time `--repeats` samples, and the table gives the median
per pair and the rate at which the touched experts' weights were read:
    python benchmarks/moe.py --device cuda --shapes real --dtypes bf16,fp32 --tokens 1,8,32,64,256
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.layers import moe
from omnistream.engine.model_executor.layers.grouped_gemm import grouped_gemm_loop, triton_installed
from omnistream.engine.model_executor.layers.moe import SparseMoeBlock

SHAPES = {  # hidden, expert width, experts, top-k
    "tiny": (128, 128, 8, 2),
    "real": (2048, 768, 128, 8),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIN_SAMPLE_S = 0.05  # a timed sample repeats the layer calls until it lasts about this long


def loop_forward(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The forward this benchmark's baseline stands for: expert sizes read on the host, one GEMM pair each."""
    weights, experts = block.route(x)
    flat_experts = experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)
    token_ids = order // block.top_k
    sorted_weights = weights.reshape(-1)[order].unsqueeze(-1)
    counts = torch.bincount(flat_experts, minlength=block.num_experts).tolist()
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate, up = F.linear(x[token_ids[rows]], block.w13[expert]).chunk(2, dim=-1)
        outputs.append(F.linear(F.silu(gate) * up, block.w2[expert]) * sorted_weights[rows])
        start += count
    return torch.zeros_like(x).index_add_(0, token_ids, torch.cat(outputs).to(x.dtype))


def grouped_loop_forward(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The current forward with the grouped GEMM op swapped for its per-expert loop twin."""
    op = moe.grouped_gemm
    moe.grouped_gemm = grouped_gemm_loop
    try:
        return block(x)
    finally:
        moe.grouped_gemm = op


VARIANTS: dict[str, Callable[[SparseMoeBlock, torch.Tensor], torch.Tensor]] = {
    "loop": loop_forward,
    "grouped": SparseMoeBlock.forward,
    "grouped-loop": grouped_loop_forward,
}


def random_layers(shape: str, dtype: torch.dtype, layers: int) -> list[SparseMoeBlock]:
    hidden, width, experts, top_k = SHAPES[shape]
    blocks = []
    for _ in range(layers):
        block = SparseMoeBlock(hidden, width, experts, top_k, norm_topk_prob=True)
        for param in block.parameters():
            param.data.normal_(0, param.shape[-1] ** -0.5)
        blocks.append(block.to(dtype))
    return blocks


def time_shape(shape: str, dtype_name: str, tokens: list[int], layers: int, repeats: int) -> None:
    blocks = random_layers(shape, DTYPES[dtype_name], layers)
    hidden = SHAPES[shape][0]
    for num_tokens in tokens:
        inputs = [torch.randn(num_tokens, hidden).to(DTYPES[dtype_name]) for _ in blocks]
        with torch.inference_mode():  # as the model runner calls the model
            outputs = {name: [fn(b, x) for b, x in zip(blocks, inputs)] for name, fn in VARIANTS.items()}
            for name in VARIANTS:
                for got, want in zip(outputs[name], outputs["grouped"]):
                    if name != "loop" and not torch.equal(got, want):
                        raise AssertionError(f"{name} != grouped at {shape} {dtype_name} T={num_tokens}")
            start = time.perf_counter()
            for block, x in zip(blocks, inputs):
                loop_forward(block, x)
            rounds = max(1, round(MIN_SAMPLE_S / (time.perf_counter() - start)))
            samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for _ in range(repeats):
                for name, fn in VARIANTS.items():
                    start = time.perf_counter()
                    for _ in range(rounds):
                        for block, x in zip(blocks, inputs):
                            fn(block, x)
                    samples[name].append((time.perf_counter() - start) / (rounds * len(blocks)))
        base = statistics.median(samples["loop"])
        cells = [f"{name} {statistics.median(s) * 1e3:8.3f} ms ({base / statistics.median(s):4.2f}x)"
                 for name, s in samples.items()]
        print(f"{shape:4} {dtype_name} T={num_tokens:<4} " + "  ".join(cells), flush=True)
    del blocks


def random_routing(num_tokens: int, num_experts: int, top_k: int, device: str) -> torch.Tensor:
    """Group ends (int32, on `device`) of T*k rows routed to k distinct random experts per token."""
    experts = torch.rand(num_tokens, num_experts).topk(top_k, dim=-1).indices.flatten()
    return torch.bincount(experts, minlength=num_experts).cumsum(0).to(torch.int32).to(device)


def cuda_gemm_variants() -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The grouped GEMM kernels timed on CUDA, by name (ours only when triton is installed)."""
    variants: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {}
    if triton_installed():
        from omnistream.engine.model_executor.layers.grouped_gemm_triton import grouped_gemm_triton

        variants["triton"] = grouped_gemm_triton
    variants["grouped_mm"] = lambda x, w, offs: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    variants["loop"] = grouped_gemm_loop
    return variants


def check_against_fp64(name: str, fn: Callable, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> None:
    """Fail unless `fn` agrees with the loop twin run in fp64: within 1e-5 of the largest output in fp32,
    2e-2 in bf16/fp16."""
    want = grouped_gemm_loop(x.double(), w.double(), offs)
    err = ((fn(x, w, offs).double() - want).abs().max() / want.abs().max()).item()
    if err > (1e-5 if x.dtype == torch.float32 else 2e-2):
        raise AssertionError(f"{name} differs from fp64 by {err:.2e} of the largest output ({x.dtype}, "
                             f"{x.shape[0]} rows, w {tuple(w.shape)})")


def time_cuda_gemms(shape: str, dtype_name: str, tokens: list[int], routings: int, repeats: int) -> None:
    hidden, width, num_experts, top_k = SHAPES[shape]
    dtype = DTYPES[dtype_name]
    w13 = (torch.randn(num_experts, 2 * width, hidden, device="cuda") * hidden**-0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, width, device="cuda") * width**-0.5).to(dtype)
    variants = cuda_gemm_variants()
    for num_tokens in tokens:
        rows = num_tokens * top_k
        cases = [(torch.randn(rows, hidden, device="cuda").to(dtype),
                  torch.randn(rows, width, device="cuda").to(dtype),
                  random_routing(num_tokens, num_experts, top_k, "cuda")) for _ in range(routings)]
        x, h, offs = cases[0]
        for name, fn in variants.items():
            check_against_fp64(name, fn, x, w13, offs)
            check_against_fp64(name, fn, h, w2, offs)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for x, h, offs in cases:
                    fn(x, w13, offs)
                    fn(h, w2, offs)
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3 / len(cases))
        # bytes of the experts that received rows, the least a pair of grouped GEMMs must read
        touched = statistics.mean((offs.diff(prepend=offs.new_zeros(1)) > 0).sum().item()
                                  for *_, offs in cases)
        weight_bytes = touched * (w13[0].numel() + w2[0].numel()) * w13.element_size()
        base = statistics.median(samples["loop"])
        cells = []
        for name, times in samples.items():
            median = statistics.median(times)
            cells.append(f"{name} {median * 1e3:7.3f} ms ({base / median:5.2f}x, "
                         f"{weight_bytes / median / 1e9:5.0f} GB/s)")
        print(f"cuda {shape:4} {dtype_name} T={num_tokens:<4} " + "  ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: the block's forward variants; cuda: the grouped GEMM kernels")
    parser.add_argument("--tokens", default="1,16,64,256", help="token counts per call, comma-separated")
    parser.add_argument("--shapes", default="tiny,real", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--layers", type=int, default=2,
                        help="layers with their own weights (real fp32: 2.4 GB each); cpu only")
    parser.add_argument("--routings", type=int, default=8,
                        help="random routings cycled per token count; cuda only")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.device == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, triton "
              f"{'installed' if triton_installed() else 'missing'}, median of {args.repeats}; "
              "ratio = loop time / variant time; GB/s = touched experts' weight bytes / time")
    else:
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.layers} layer(s), "
              f"median of {args.repeats}; ratio = loop time / variant time")
    for shape in args.shapes.split(","):
        for dtype_name in args.dtypes.split(","):
            if args.device == "cuda":
                time_cuda_gemms(shape, dtype_name, tokens, args.routings, args.repeats)
            else:
                time_shape(shape, dtype_name, tokens, args.layers, args.repeats)


if __name__ == "__main__":
    main()
