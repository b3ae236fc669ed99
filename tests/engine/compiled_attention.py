"""Worker for the Triton attention tests: compiles our attention and KV-write kernels ahead of time for a GPU
architecture, with no GPU present (the ptxas Triton ships does the last step), and reports what each needs.

The interpreter runs what Triton's compiler would reject (types changing in a loop, dot shapes, early returns), so
the interpreted tests alone do not show that the kernels build for a GPU. The tiles and warps are those the backend
launches for the thinker's attention shapes (head_dim 128, 8 query heads per KV head, 16-token pages). Run in a
fresh process without TRITON_INTERPRET (under it `@triton.jit` makes interpreted functions, which do not compile).
Usage: python compiled_attention.py CAPABILITY (e.g. 90); prints one JSON object {kernel: {"shared": bytes of
shared memory, "registers": per thread, "spill": bytes of local memory (stack) per thread}}; registers and spill
come from the cuobjdump Triton ships.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from omnistream.engine.model_executor.attention import triton_attention, triton_kv_write
from omnistream.engine.model_executor.attention.triton_plan import MIN_ROWS, next_power_of_2, plan_attention

HEAD_DIM, GROUP, PAGE_SIZE = 128, 8, 16
INDEX_POINTERS = {"query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "block_table_ptr": "*i32",
                  "slot_mapping_ptr": "*i64", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(kernel, dtype: str, constants: dict, capability: int, num_warps: int = 4) -> dict[str, int]:
    """What `kernel` needs, compiled with these constexprs and warps, data pointers of `dtype`."""
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = INDEX_POINTERS.get(name, f"*{dtype}")
        else:
            signature[name] = "fp32" if name == "scale_log2" else "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return {"shared": compiled.metadata.shared, "registers": int(registers), "spill": int(stack)}


def tiles(max_query_len: int) -> tuple[int, dict]:
    """BLOCK_Q and the constexprs the backend plans for a step whose longest request adds max_query_len tokens."""
    plan = plan_attention(num_reqs=4, num_kv_heads=4, group_size=GROUP, head_dim=HEAD_DIM,
                          max_query_len=max_query_len, max_seq_len=4096)
    return plan.block_q, {"HEAD_DIM": HEAD_DIM, "DIM_PAD": HEAD_DIM, "PAGE_SIZE": PAGE_SIZE, "BLOCK_N": plan.block_n}


def main(capability: str) -> None:
    needs = {}
    warps = triton_attention.NUM_WARPS
    for dtype, max_query_len in (("fp32", 64), ("bf16", 1)):  # IEEE fp32 and tensor-core products, both tile sizes
        block_q, common = tiles(max_query_len)
        common["DOT_PRECISION"] = "ieee" if dtype == "fp32" else None
        needs[f"attention-{dtype}-q{max_query_len}"] = compile_kernel(
            triton_attention._attention_kernel, dtype,
            {**common, "GROUP": GROUP, "GROUP_PAD": next_power_of_2(GROUP), "BLOCK_Q": block_q}, int(capability),
            warps)
    _, common = tiles(1)
    needs["split-bf16"] = compile_kernel(
        triton_attention._split_kernel, "bf16",
        {**common, "DOT_PRECISION": None, "GROUP": GROUP, "ROWS": max(MIN_ROWS, GROUP)}, int(capability), warps)
    needs["merge-bf16"] = compile_kernel(
        triton_attention._merge_kernel, "bf16", {"SPLITS_PAD": 32, "HEAD_DIM": HEAD_DIM, "DIM_PAD": HEAD_DIM},
        int(capability))
    needs["kv-write-bf16"] = compile_kernel(
        triton_kv_write._kv_write_kernel, "bf16",
        {"NUM_KV_HEADS": 4, "HEAD_DIM": HEAD_DIM, "PAGE_SIZE": PAGE_SIZE, "BLOCK": 4 * HEAD_DIM}, int(capability))
    print(json.dumps(needs))


if __name__ == "__main__":
    main(*sys.argv[1:])
