"""Every attention backend equals `reference` (fp32, atol 1e-5) on random flat batches that mix prefill chunks over
cached prefixes, fresh prefills, long chunks, decodes and a padded row, with pages out of order, contexts ending on
and across page edges, GQA groups of 1, 2, 4 and 8, block sizes 8, 16, 24 and 32 and head dims 24 to 136; bfloat16 caches come close, float16 and
other devices are refused by name; a padded row reads nothing, gets zeros and writes only the sink page."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata, write_kv_cache
from omnistream.engine.model_executor.attention.cpu_kernel import FLASH_MIN_QUERIES, load_kernel, run_kernel
from omnistream.engine.model_executor.attention.reference import ReferenceBackend
from omnistream.engine.model_executor.attention.selector import get_attention_backend
from omnistream.engine.model_executor.layers.grouped_gemm import triton_installed

HEAD_DIM = 64
FAST_BACKENDS = ["cpu"]


def _needs_kernel(name: str) -> None:
    if name == "cpu" and load_kernel() is None:
        pytest.fail("the cpu attention kernel did not build (is a C compiler installed?)")


def _random_batch(seed: int, block_size: int, heads: int, kv_heads: int, dtype: torch.dtype = torch.float32,
                  head_dim: int = HEAD_DIM):
    """(query, key, value, cache, metadata, live pages, sink page): requests of (context before, new tokens), the
    last one a padded row (seq_len 0, its tokens' slots in the sink page), every table a random sample of pages."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    shapes = [(0, rng.randint(2, 30)), (rng.randint(1, 90), rng.randint(2, 20)),  # fresh prefill, chunk over a prefix
              (3 * block_size - 1, 1), (3 * block_size, 1), (2 * block_size - 3, 5),  # ends at and across page edges
              (rng.randint(100, 300), FLASH_MIN_QUERIES + rng.randint(0, 40)),  # a long chunk over a context
              (0, FLASH_MIN_QUERIES + rng.randint(0, 40)),  # a long fresh prompt
              *[(rng.randint(1, 400), 1) for _ in range(6)]]  # decodes
    rng.shuffle(shapes)
    pages = [-(-(past + new) // block_size) for past, new in shapes]
    num_pages = sum(pages) + 8
    sink = num_pages
    pool = list(range(num_pages))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in pages]
    width = max(pages) + 2  # unused entries point at the sink, as the runner's rows do
    table = np.full((len(shapes) + 1, width), sink)
    for i, row in enumerate(tables):
        table[i, : len(row)] = row
    real = AttentionMetadata.build([new for _, new in shapes], [past + new for past, new in shapes], table[:-1],
                                   block_size)
    padded_tokens = 3
    num_tokens = real.num_tokens + padded_tokens
    metadata = AttentionMetadata(
        query_start_loc=torch.cat([real.query_start_loc, torch.tensor([num_tokens], dtype=torch.int32)]),
        seq_lens=torch.cat([real.seq_lens, torch.zeros(1, dtype=torch.int32)]),
        block_table=torch.from_numpy(table.astype(np.int32)),
        slot_mapping=torch.cat([real.slot_mapping, sink * block_size + torch.arange(padded_tokens)]),
        num_tokens=num_tokens, num_reqs=len(shapes) + 1, max_query_len=real.max_query_len,
        max_seq_len=real.max_seq_len,
    )
    cache = torch.randn(2, num_pages + 1, block_size, kv_heads, head_dim).to(dtype)
    query = torch.randn(num_tokens, heads, head_dim)
    key, value = torch.randn(num_tokens, kv_heads, head_dim), torch.randn(num_tokens, kv_heads, head_dim)
    return query, key, value, cache, metadata, real.num_tokens


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_backend_equals_reference_on_a_mixed_batch(backend: str, block_size: int, heads: int, kv_heads: int,
                                                   seed: int) -> None:
    _needs_kernel(backend)
    query, key, value, cache, metadata, real_tokens = _random_batch(seed, block_size, heads, kv_heads)
    fast = get_attention_backend(backend, torch.device("cpu"), torch.float32, heads, kv_heads, HEAD_DIM)
    assert fast.name == backend
    ref_cache = cache.clone()
    want = ReferenceBackend().forward(query, key, value, ref_cache, metadata, HEAD_DIM**-0.5)
    got = fast.forward(query, key, value, cache, metadata, HEAD_DIM**-0.5)
    assert torch.equal(cache, ref_cache)  # both wrote the same slots
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not got[real_tokens:].any() and not want[real_tokens:].any()  # the padded row reads nothing


@pytest.mark.parametrize(("head_dim", "block_size"), [(24, 16), (40, 8), (80, 24), (136, 16), (128, 32)])
def test_cpu_kernel_equals_reference_for_head_dims_and_pages_off_its_vector_width(head_dim: int,
                                                                                   block_size: int) -> None:
    """The kernel works in vectors of 16 floats and chunks of 16 keys: heads with a scalar tail (24, 40, 136),
    more vectors than it accumulates at once (80, 128, 136) and pages that split its chunks (8, 24)."""
    _needs_kernel("cpu")
    query, key, value, cache, metadata, real_tokens = _random_batch(2, block_size, 8, 2, head_dim=head_dim)
    fast = get_attention_backend("cpu", torch.device("cpu"), torch.float32, 8, 2, head_dim)
    ref_cache = cache.clone()
    want = ReferenceBackend().forward(query, key, value, ref_cache, metadata, head_dim**-0.5)
    got = fast.forward(query, key, value, cache, metadata, head_dim**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not got[real_tokens:].any()


@pytest.mark.parametrize("variant", ["openmp", "pthreads", "serial"])
@pytest.mark.parametrize("num_threads", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_per_request_or_per_kv_head_items_equal_reference(variant: str, num_threads: int,
                                                                      dtype: torch.dtype) -> None:
    """One work item reads all KV heads of a request, or, with more threads than a quarter of the requests (64 here),
    one KV head each: both equal `reference` on every row, long chunks included (the kernel is called directly), for
    float32 caches and bfloat16 ones (which the kernel widens exactly: the reference reads the same values in fp32)."""
    _needs_kernel("cpu")
    library = load_kernel(variant)
    query, key, value, cache, metadata, _ = _random_batch(3, 16, 8, 2, dtype)
    want = ReferenceBackend().forward(query, key.to(dtype).float(), value.to(dtype).float(), cache.float(), metadata,
                                      HEAD_DIM**-0.5)
    write_kv_cache(key, value, cache, metadata.slot_mapping)
    got = torch.empty_like(query)
    arrays = [np.ascontiguousarray(t.numpy()) for t in (metadata.query_start_loc, metadata.seq_lens,
                                                         metadata.block_table)]
    run_kernel(library, query, cache, *arrays, HEAD_DIM**-0.5, got, num_threads)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_forward_with_this_steps_keys_equals_reading_them_back_from_the_cache(dtype: torch.dtype) -> None:
    _needs_kernel("cpu")
    query, key, value, cache, metadata, _ = _random_batch(4, 16, 4, 2, dtype)
    fast = get_attention_backend("cpu", torch.device("cpu"), dtype, 4, 2, HEAD_DIM)
    got = fast.forward(query, key, value, cache, metadata, HEAD_DIM**-0.5)  # long chunks: keys as given
    assert torch.equal(got, fast.attend(query, cache, metadata, HEAD_DIM**-0.5))  # long chunks: keys read back


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_padded_tokens_write_only_the_sink_page(backend: str) -> None:
    _needs_kernel(backend)
    query, key, value, cache, metadata, real_tokens = _random_batch(2, 16, 4, 2)
    fast = get_attention_backend(backend, torch.device("cpu"), torch.float32, 4, 2, HEAD_DIM)
    before = cache.clone()
    real_slots = metadata.slot_mapping[:real_tokens]
    fast.forward(query, key, value, cache, metadata, HEAD_DIM**-0.5)
    changed = (cache != before).flatten(3).any(-1).any(0).flatten().nonzero().flatten()  # written slots
    sink = cache.shape[1] - 1
    assert set(changed.tolist()) <= set(real_slots.tolist()) | set(range(sink * 16, sink * 16 + 16))
    assert (changed // 16 == sink).sum() == 3


def test_cpu_backend_reads_bfloat16_caches_close_to_reference() -> None:
    _needs_kernel("cpu")
    query, key, value, cache, metadata, _ = _random_batch(3, 32, 8, 2, torch.bfloat16)
    fast = get_attention_backend("cpu", torch.device("cpu"), torch.bfloat16, 8, 2, HEAD_DIM)
    want = ReferenceBackend().forward(query.bfloat16(), key, value, cache.clone(), metadata, HEAD_DIM**-0.5)
    got = fast.forward(query.bfloat16(), key, value, cache, metadata, HEAD_DIM**-0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=0)


def test_what_a_backend_cannot_run_is_refused_by_name() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        get_attention_backend("cpu", cpu, torch.float16, 4, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        get_attention_backend("cpu", torch.device("cuda"), torch.float32, 4, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="one of auto, reference, cpu, triton"):
        get_attention_backend("flash", cpu, torch.float32, 4, 2, HEAD_DIM)
    assert get_attention_backend("auto", cpu, torch.float16, 4, 2, HEAD_DIM).name == "reference"
    on_cuda = get_attention_backend("auto", torch.device("cuda"), torch.float32, 4, 2, HEAD_DIM).name
    assert on_cuda == ("triton" if triton_installed() else "reference")
