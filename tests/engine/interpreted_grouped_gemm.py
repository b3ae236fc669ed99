"""Worker for the Triton grouped-GEMM tests: runs our kernel under Triton's interpreter on CPU tensors.

Triton reads TRITON_INTERPRET whenever `@triton.jit` decorates a function, its own library's included, so
the variable must be set before triton is first imported; a pytest process may already have imported it
(torch._dynamo does). This script sets it first thing in a fresh process.
Usage: python interpreted_grouped_gemm.py CASES.pt OUTPUTS.pt, where CASES.pt maps names to (x, w, offs).
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch

from omnistream.engine.model_executor.layers.grouped_gemm_triton import grouped_gemm_triton


def main(cases_path: str, outputs_path: str) -> None:
    cases = torch.load(cases_path)
    torch.save({name: grouped_gemm_triton(x, w, offs) for name, (x, w, offs) in cases.items()}, outputs_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
