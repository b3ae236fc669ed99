"""Worker for the Triton attention tests: compiles our attention and KV-write kernels ahead of time for a GPU
architecture, with no GPU present (Triton's own ptxas does the last step), and prints each kernel's shared memory.

The interpreter runs what Triton's compiler would reject (types changing in a loop, dot shapes, early returns), so
the interpreted tests alone do not show that the kernels build for a GPU. The tiles are those the launch plan
picks for the thinker's attention shapes (head_dim 128, 8 query heads per KV head, 16-token pages). Run in a fresh
process without TRITON_INTERPRET (under it `@triton.jit` makes interpreted functions, which do not compile).
Usage: python compiled_attention.py CAPABILITY (e.g. 90); prints one JSON object {kernel name: shared bytes}.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from omnistream.engine.model_executor.attention import triton_attention, triton_kv_write
from omnistream.engine.model_executor.attention.triton_plan import MIN_ROWS, next_power_of_2, plan_attention

HEAD_DIM, GROUP, PAGE_SIZE = 128, 8, 16
INDEX_POINTERS = {"query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "block_table_ptr": "*i32",
                  "slot_mapping_ptr": "*i64", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32"}


def compile_kernel(kernel, dtype: str, constants: dict, capability: int) -> int:
    """Shared memory bytes of `kernel` compiled with these constexprs, data pointers of `dtype`."""
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = INDEX_POINTERS.get(name, f"*{dtype}")
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", capability, 32))
    return compiled.metadata.shared


def tiles(dtype: str, max_query_len: int) -> dict:
    element_size = 4 if dtype == "fp32" else 2
    plan = plan_attention(num_reqs=4, num_kv_heads=4, group_size=GROUP, max_query_len=max_query_len,
                          max_seq_len=4096, cache_element_size=element_size)
    return {"HEAD_DIM": HEAD_DIM, "DIM_PAD": HEAD_DIM, "PAGE_SIZE": PAGE_SIZE, "BLOCK_N": plan.block_n,
            "DOT_PRECISION": "ieee" if dtype == "fp32" else None, "block_q": plan.block_q}


def main(capability: str) -> None:
    shared = {}
    for dtype, max_query_len in (("fp32", 64), ("bf16", 1)):  # IEEE fp32 and tensor-core products, both tile sizes
        common = tiles(dtype, max_query_len)
        block_q = common.pop("block_q")
        shared[f"attention-{dtype}-q{max_query_len}"] = compile_kernel(
            triton_attention._attention_kernel, dtype,
            {**common, "GROUP": GROUP, "GROUP_PAD": next_power_of_2(GROUP), "BLOCK_Q": block_q}, int(capability))
    common = tiles("bf16", 1)
    common.pop("block_q")
    shared["split-bf16"] = compile_kernel(
        triton_attention._split_kernel, "bf16", {**common, "GROUP": GROUP, "ROWS": max(MIN_ROWS, GROUP)},
        int(capability))
    shared["merge-bf16"] = compile_kernel(
        triton_attention._merge_kernel, "bf16", {"SPLITS_PAD": 32, "HEAD_DIM": HEAD_DIM, "DIM_PAD": HEAD_DIM},
        int(capability))
    shared["kv-write-bf16"] = compile_kernel(
        triton_kv_write._kv_write_kernel, "bf16",
        {"NUM_KV_HEADS": 4, "HEAD_DIM": HEAD_DIM, "PAGE_SIZE": PAGE_SIZE, "BLOCK": 4 * HEAD_DIM}, int(capability))
    print(json.dumps(shared))


if __name__ == "__main__":
    main(*sys.argv[1:])
