"""BlockPool: LRU free queue, ref counts, touch, the hash map and eviction; the block-hash chain."""

import pytest

from omnistream.scheduler.block_hash import hash_block_tokens
from omnistream.scheduler.block_pool import BlockPool


def test_allocate_takes_from_head_and_free_goes_to_tail():
    pool = BlockPool(4, enable_prefix_caching=True)
    a, b = pool.allocate(2)
    assert [a.block_id, b.block_id] == [0, 1] and a.ref_cnt == b.ref_cnt == 1
    pool.free_blocks([b, a])
    assert pool.get_num_free_blocks() == 4
    assert [blk.block_id for blk in pool.allocate(4)] == [2, 3, 1, 0]


def test_usage_and_over_allocation():
    pool = BlockPool(4, enable_prefix_caching=False)
    pool.allocate(3)
    assert pool.usage == pytest.approx(0.75)
    with pytest.raises(ValueError, match="only 1 are free"):
        pool.allocate(2)


def test_double_free_is_an_error():
    pool = BlockPool(2, enable_prefix_caching=False)
    (block,) = pool.allocate(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])


def test_touch_revives_a_free_cached_block_and_allocation_evicts():
    pool = BlockPool(2, enable_prefix_caching=True)
    a, b = pool.allocate(2)
    h = hash_block_tokens(None, [1, 2])
    pool.cache_block(a, h)
    pool.free_blocks([b, a])  # a is free but still cached
    assert pool.get_cached_block(h) is a
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.get_num_free_blocks() == 1
    pool.free_blocks([a])  # order now: b, a
    pool.allocate(1)  # b: a stays cached
    assert pool.get_cached_block(h) is a
    pool.allocate(1)  # a: evicted
    assert pool.get_cached_block(h) is None and a.block_hash is None


def test_first_block_with_a_hash_wins_and_disabled_pool_caches_nothing():
    pool = BlockPool(3, enable_prefix_caching=True)
    a, b, _ = pool.allocate(3)
    h = hash_block_tokens(None, [7])
    pool.cache_block(a, h)
    pool.cache_block(b, h)
    assert pool.get_cached_block(h) is a and b.block_hash is None
    off = BlockPool(1, enable_prefix_caching=False)
    (c,) = off.allocate(1)
    off.cache_block(c, h)
    assert off.get_cached_block(h) is None


def test_hash_chain_is_deterministic_and_sensitive():
    root = hash_block_tokens(None, [1, 2, 3])
    assert root == hash_block_tokens(None, (1, 2, 3))
    assert isinstance(root, bytes) and len(root) == 32
    assert hash_block_tokens(root, [4]) != hash_block_tokens(None, [4])
    assert hash_block_tokens(None, [1, 2, 3], ("img:abc",)) != root
    assert hash_block_tokens(None, [1, 2, 3], ("img:abc",)) != hash_block_tokens(None, [1, 2, 3], ("img:abd",))


def test_pool_needs_a_block():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, enable_prefix_caching=True)
