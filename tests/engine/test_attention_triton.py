"""The `triton` attention backend equals `reference`, and its launch plan and selection follow their rules.

On CPU the kernels run under Triton's interpreter (in a fresh process: interpreted_attention.py) on tiny random
steps: mixed batches (fresh prefills, chunks over cached prefixes, contexts ending on and across page edges,
decodes, a padded row), GQA groups of 1, 2, 4 and 8, block sizes 16 and 32, a head_dim that is not a power of two,
queries and keys read from a packed qkv tensor, query tiles smaller than a request, decode-only steps through the
split-KV kernels (several segments, empty ones, padded rows), and the backend under torch.compile(fullgraph=True).
fp32 within 1e-5, fp16 close (bf16 `tl.dot` is broken in the interpreter); every case also checks the KV write,
slot for slot, and the KV write alone fills a bfloat16 cache. The kernels are also compiled ahead of time for an
SM90 GPU (compiled_attention.py: no GPU needed) and must fit its shared memory without spilling registers. On CUDA
(skipped here) the same cases run in fp32, bf16 and fp16, and a whole decode step of the model makes no host sync.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.model_executor.attention import selector
from omnistream.engine.model_executor.attention.backend import AttentionMetadata, write_kv_cache
from omnistream.engine.model_executor.attention.reference import ReferenceBackend
from omnistream.engine.model_executor.attention.selector import get_attention_backend
from omnistream.engine.model_executor.attention.triton_plan import (
    MIN_ROWS,
    AttentionPlan,
    next_power_of_2,
    plan_attention,
)
from omnistream.engine.model_executor.loader import load_model

H100_SHARED_BYTES = 227 * 1024  # shared memory one block may use on an H100/H200
EDGE = [(2 * 16 - 1, 1), (3 * 16, 1), (2 * 16 - 3, 5)]  # contexts ending at and across 16-token page edges


def make_step(seed: int, shapes: list[tuple[int, int]], *, block_size: int, heads: int, kv_heads: int,
              head_dim: int = 64, padding: tuple[int, ...] = (), dtype: torch.dtype = torch.float32,
              packed: bool = False) -> dict:
    """One step of requests (context before, new tokens) with pages drawn at random from a pool, then padded rows of
    `padding` tokens each (seq_len 0, slots in the sink page); unused table entries point at the sink, as the
    runner's do; max_seq_len is the table's capacity, the static bound a CUDA-graph step passes."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pages = [-(-(past + new) // block_size) for past, new in shapes]
    sink = sum(pages) + 4
    pool = list(range(sink))
    rng.shuffle(pool)
    width = max(pages) + 1
    table = np.full((len(shapes) + len(padding), width), sink, dtype=np.int32)
    for i, n in enumerate(pages):
        table[i, :n] = [pool.pop() for _ in range(n)]
    real = AttentionMetadata.build([new for _, new in shapes], [past + new for past, new in shapes],
                                   table[: len(shapes)], block_size)
    num_tokens = real.num_tokens + sum(padding)
    ends = real.num_tokens + np.cumsum(padding, dtype=np.int64)
    metadata = AttentionMetadata(
        query_start_loc=torch.cat([real.query_start_loc, torch.from_numpy(ends).int()]),
        seq_lens=torch.cat([real.seq_lens, torch.zeros(len(padding), dtype=torch.int32)]),
        block_table=torch.from_numpy(table),
        slot_mapping=torch.cat([real.slot_mapping, sink * block_size + torch.arange(sum(padding)) % block_size]),
        num_tokens=num_tokens, num_reqs=len(shapes) + len(padding), max_query_len=max(real.max_query_len, *padding, 0),
        max_seq_len=width * block_size,
    )
    if packed:  # q, k, v as the model's views of one projection output
        qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
        query, key, value = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        query = query.view(num_tokens, heads, head_dim)
        key, value = key.view(num_tokens, kv_heads, head_dim), value.view(num_tokens, kv_heads, head_dim)
    else:
        query = torch.randn(num_tokens, heads, head_dim).to(dtype)
        key, value = (torch.randn(num_tokens, kv_heads, head_dim).to(dtype) for _ in range(2))
    cache = torch.randn(2, sink + 1, block_size, kv_heads, head_dim).to(dtype)
    return {"query": query, "key": key, "value": value, "cache": cache, "metadata": metadata,
            "scale": head_dim**-0.5, "padded_from": real.num_tokens}


def decodes(seed: int, count: int, longest: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, longest), 1) for _ in range(count - 1)] + [(longest, 1)]


def interpreter_cases() -> dict[str, dict]:
    mixed = [(0, 21), (40, 9), *EDGE, (70, 1), (130, 1)]
    cases = {
        "mixed-gqa2-bs16-backend": (make_step(0, mixed, block_size=16, heads=4, kv_heads=2, padding=(3,)), None),
        "mixed-gqa8-bs32-small-tiles": (make_step(1, mixed, block_size=32, heads=8, kv_heads=1, padding=(2,)),
                                        AttentionPlan(block_q=2, block_n=16, num_splits=1, split_len=0)),
        "mixed-mha-bs16-head48": (make_step(2, mixed, block_size=16, heads=2, kv_heads=2, head_dim=48),
                                  AttentionPlan(block_q=16, block_n=32, num_splits=1, split_len=0)),
        "mixed-gqa2-packed-qkv-backend": (make_step(3, mixed, block_size=16, heads=4, kv_heads=2, packed=True), None),
        "mixed-gqa2-compiled-backend": (make_step(8, mixed, block_size=16, heads=4, kv_heads=2, padding=(1,)), None),
        "decode-gqa4-unified": (make_step(4, decodes(4, 6, 300), block_size=16, heads=8, kv_heads=2, padding=(1, 1)),
                                AttentionPlan(block_q=4, block_n=32, num_splits=1, split_len=0)),
        "decode-gqa4-split": (make_step(4, decodes(4, 6, 300), block_size=16, heads=8, kv_heads=2, padding=(1, 1)),
                              AttentionPlan(block_q=4, block_n=64, num_splits=3, split_len=128)),
        "decode-gqa4-split-past-the-bound": (
            make_step(4, decodes(4, 6, 300), block_size=16, heads=8, kv_heads=2, padding=(1, 1)),
            AttentionPlan(block_q=4, block_n=32, num_splits=2, split_len=64)),  # keys 128.. go to the last segment
        "decode-gqa2-bs32-backend": (make_step(5, decodes(5, 3, 400), block_size=32, heads=4, kv_heads=2,
                                               padding=(1,)), None),
        "fp16-mixed-gqa2-backend": (make_step(6, mixed, block_size=16, heads=4, kv_heads=2, padding=(3,),
                                              dtype=torch.float16), None),
        "fp16-decode-gqa4-split": (make_step(7, decodes(7, 4, 300), block_size=16, heads=8, kv_heads=2,
                                             dtype=torch.float16),
                                   AttentionPlan(block_q=4, block_n=32, num_splits=5, split_len=64)),
    }
    cases = {name: {**step, "plan": plan, "compiled": "compiled" in name} for name, (step, plan) in cases.items()}
    # bfloat16 moves through loads and stores (the interpreter's fp32 -> bf16 cast truncates: no casts here)
    bf16_write = make_step(9, mixed, block_size=16, heads=4, kv_heads=2, padding=(2,), dtype=torch.bfloat16,
                           packed=True)
    return {**cases, "kv-write-bf16": {**bf16_write, "plan": "kv-write", "compiled": False}}


CASES = interpreter_cases()


def backend_plan(case: dict) -> AttentionPlan:
    """The plan the backend makes for a case off the GPU (what the interpreter run used)."""
    metadata, heads, kv_heads = case["metadata"], case["query"].shape[1], case["cache"].shape[3]
    return plan_attention(num_reqs=metadata.num_reqs, num_kv_heads=kv_heads, group_size=heads // kv_heads,
                          head_dim=case["query"].shape[2],
                          max_query_len=metadata.max_query_len, max_seq_len=metadata.max_seq_len)


def reference_step(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference backend's output and cache after the step, computed in fp32 from the case's values."""
    cache = case["cache"].float().clone()
    out = ReferenceBackend().forward(case["query"].float(), case["key"].float(), case["value"].float(), cache,
                                     case["metadata"], case["scale"])
    return out, cache


def assert_matches_reference(case: dict, got: torch.Tensor, cache_after: torch.Tensor) -> None:
    want, want_cache = reference_step({name: _to_cpu(value) for name, value in case.items()})
    got, cache_after = got.cpu(), cache_after.cpu()
    assert got.dtype == case["query"].dtype and got.shape == case["query"].shape
    assert torch.equal(cache_after.float(), want_cache.to(cache_after.dtype).float())  # the same slots written
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[case["query"].dtype]
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=0)
    assert not got[case["padded_from"]:].any()  # padded rows read nothing


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, AttentionMetadata):
        return AttentionMetadata(value.query_start_loc.cpu(), value.seq_lens.cpu(), value.block_table.cpu(),
                                 value.slot_mapping.cpu(), value.num_tokens, value.num_reqs, value.max_query_len,
                                 value.max_seq_len)
    return value


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(output, cache after) of every case, from one interpreter run in a fresh process."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("interpreted_attention")
    torch.save(CASES, folder / "cases.pt")
    worker = Path(__file__).with_name("interpreted_attention.py")
    done = subprocess.run([sys.executable, str(worker), str(folder / "cases.pt"), str(folder / "out.pt")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return torch.load(folder / "out.pt")


ATTENTION_CASES = [name for name, case in CASES.items() if case["plan"] != "kv-write"]


@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_interpreted_kernels_equal_reference(interpreted, name) -> None:
    assert_matches_reference(CASES[name], *interpreted[name])


def test_interpreted_kv_write_fills_a_bfloat16_cache_like_its_twin(interpreted) -> None:
    case = CASES["kv-write-bf16"]
    want = case["cache"].clone()
    write_kv_cache(case["key"], case["value"], want, case["metadata"].slot_mapping)
    got = interpreted["kv-write-bf16"][1]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert not torch.equal(got, case["cache"])  # it wrote something


def test_the_cases_reach_the_paths_they_are_named_for() -> None:
    assert backend_plan(CASES["mixed-gqa2-bs16-backend"]).num_splits == 1
    assert backend_plan(CASES["decode-gqa2-bs32-backend"]).num_splits > 1  # the engine's plan splits small decodes
    small_tiles = CASES["mixed-gqa8-bs32-small-tiles"]
    assert small_tiles["metadata"].max_query_len > 4 * small_tiles["plan"].block_q  # requests span several tiles
    split = CASES["decode-gqa4-split"]
    lens = split["metadata"].seq_lens
    assert lens.max() > 2 * split["plan"].split_len and lens.min() == 0  # full, partial and empty segments
    packed = CASES["mixed-gqa2-packed-qkv-backend"]
    assert not packed["query"].is_contiguous() and not packed["key"].is_contiguous()


@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 16, 32])
@pytest.mark.parametrize("max_query_len", [1, 2, 40])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_query_tiles_hold_enough_rows_for_tl_dot(group, max_query_len, head_dim) -> None:
    plan = plan_attention(num_reqs=4, num_kv_heads=2, group_size=group, head_dim=head_dim,
                          max_query_len=max_query_len, max_seq_len=1000)
    assert plan.block_q >= 1 and plan.block_q * next_power_of_2(group) >= MIN_ROWS


def test_only_decode_steps_with_few_programs_split_the_keys() -> None:
    def plan(num_reqs: int, max_query_len: int = 1, max_seq_len: int = 4096):
        return plan_attention(num_reqs=num_reqs, num_kv_heads=4, group_size=8, head_dim=128,
                              max_query_len=max_query_len, max_seq_len=max_seq_len, num_sms=132)

    for small in (plan(1), plan(8), plan(1, max_seq_len=300)):
        assert small.num_splits > 1 and small.split_len % small.block_n == 0
    one = plan(1)
    assert (one.num_splits - 1) * one.split_len < 4096 <= one.num_splits * one.split_len  # no segment past the end
    assert plan(1).num_splits >= plan(8).num_splits
    assert plan(256).num_splits == 1  # enough (request, KV head) programs already
    assert plan(1, max_query_len=2).num_splits == 1  # prefill tokens in the step
    assert plan(1, max_seq_len=100).num_splits == 1  # too few keys to share out


def test_selection_of_triton(monkeypatch) -> None:
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        get_attention_backend("triton", cpu, torch.float32, 4, 2, 64)
    assert get_attention_backend("triton", meta, torch.float32, 4, 2, 64).name == "triton"
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        get_attention_backend("triton", meta, torch.float64, 4, 2, 64)
    with pytest.raises(ValueError, match="head_dim <= 256"):
        get_attention_backend("triton", meta, torch.float32, 4, 2, 512)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_attention_backend("triton", cpu, torch.float16, 4, 2, 64).name == "triton"
    assert get_attention_backend("auto", cpu, torch.float32, 4, 2, 64).name != "triton"  # the interpreter is for tests
    monkeypatch.setattr(selector, "triton_installed", lambda: True)
    assert get_attention_backend("triton", cuda, torch.bfloat16, 4, 2, 64).name == "triton"
    assert get_attention_backend("auto", cuda, torch.bfloat16, 4, 2, 64).name == "triton"
    assert get_attention_backend("auto", cuda, torch.float64, 4, 2, 64).name == "reference"
    monkeypatch.setattr(selector, "triton_installed", lambda: False)
    assert get_attention_backend("auto", cuda, torch.bfloat16, 4, 2, 64).name == "reference"
    with pytest.raises(ValueError, match="needs triton"):
        get_attention_backend("triton", cuda, torch.bfloat16, 4, 2, 64)


def test_the_backend_imports_and_runs_on_meta_without_triton() -> None:
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now fails
        import torch
        from omnistream.engine.model_executor.attention.backend import AttentionMetadata, write_kv_cache
        from omnistream.engine.model_executor.attention.selector import get_attention_backend
        backend = get_attention_backend("triton", torch.device("meta"), torch.bfloat16, 8, 2, 64)
        metadata = AttentionMetadata.build([3, 1], [3, 20], [[0, 1], [2, 3]], 16, "meta")
        q, k = torch.empty(4, 8, 64, device="meta"), torch.empty(4, 2, 64, device="meta")
        out = backend.forward(q, k, k, torch.empty(2, 5, 16, 2, 64, device="meta"), metadata, 0.125)
        assert out.shape == q.shape and out.device.type == "meta"
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_the_kernels_compile_for_an_sm90_gpu_within_its_shared_memory_and_registers(tmp_path) -> None:
    pytest.importorskip("triton")
    worker = Path(__file__).with_name("compiled_attention.py")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here and now, not found in a cache
    done = subprocess.run([sys.executable, str(worker), "90"], capture_output=True, text=True, timeout=300,
                          check=False, env=env)
    assert done.returncode == 0, done.stderr
    needs = json.loads(done.stdout.splitlines()[-1])
    assert len(needs) == 5
    for kernel, need in needs.items():
        assert need["shared"] <= H100_SHARED_BYTES and need["spill"] == 0, (kernel, need)


def _on_cuda(case: dict, dtype: torch.dtype) -> dict:
    moved = {name: value.to("cuda", dtype) if name in ("query", "key", "value", "cache") else value
             for name, value in case.items()}
    metadata = case["metadata"]
    moved["metadata"] = AttentionMetadata(
        metadata.query_start_loc.cuda(), metadata.seq_lens.cuda(), metadata.block_table.cuda(),
        metadata.slot_mapping.cuda(), metadata.num_tokens, metadata.num_reqs, metadata.max_query_len,
        metadata.max_seq_len)
    return moved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", [name for name in ATTENTION_CASES if not name.startswith("fp16")])
def test_on_cuda_kernels_equal_reference_without_a_host_sync(name, dtype) -> None:
    from omnistream.engine.model_executor.attention.triton_attention import paged_attention
    from omnistream.engine.model_executor.attention.triton_kv_write import write_kv_triton

    case = _on_cuda(CASES[name], dtype)
    query, key, value, cache, metadata = (case[n] for n in ("query", "key", "value", "cache", "metadata"))
    backend = get_attention_backend("triton", torch.device("cuda"), dtype, query.shape[1], cache.shape[3],
                                    query.shape[2])
    for sync_mode in ("default", "error"):  # the first run compiles the kernels
        cache = case["cache"].clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            if case["plan"] is None:
                out = backend.forward(query, key, value, cache, metadata, case["scale"])
            else:
                write_kv_triton(key, value, cache, metadata.slot_mapping)
                out = paged_attention(query, cache, metadata.query_start_loc, metadata.seq_lens,
                                      metadata.block_table, case["scale"], case["plan"])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert_matches_reference(case, out, cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_cuda_a_decode_step_of_the_model_makes_no_host_sync(dtype) -> None:
    device = torch.device("cuda")
    model = load_model(default_model_path(), dtype, device, "triton")[0]
    assert model.attention_backend == "triton"
    block_size, shapes = 16, [(5, 1), (64, 1), (199, 1)]
    caches = [torch.zeros(model.kv_cache_shape_per_layer(64, block_size), dtype=next(model.parameters()).dtype,
                          device=device) for _ in range(model.num_layers)]
    counts = [-(-(past + new) // block_size) for past, new in shapes]
    firsts = np.cumsum([0, *counts])
    tables = [list(range(first, first + n)) + [63] * (max(counts) - n)
              for first, n in zip(firsts[:-1], counts, strict=True)]
    metadata = AttentionMetadata.build([n for _, n in shapes], [p + n for p, n in shapes], tables, block_size,
                                       device)
    positions = torch.tensor([p for p, _ in shapes], dtype=torch.float32).expand(3, -1).contiguous().to(device)
    ids = torch.randint(0, model.config.text.vocab_size, (len(shapes),)).to(device)
    with torch.inference_mode():
        model(ids, positions, caches, metadata)  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            hidden = model(ids, positions, caches, metadata)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(hidden).all()
