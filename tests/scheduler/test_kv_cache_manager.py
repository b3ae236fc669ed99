"""KVCacheManager: prefix lookup limits, allocation with hits, counters, freeing order."""

from omnistream.scheduler.kv_cache_manager import KVCacheManager


def _admit(kv, req):
    hits, num_hit = kv.get_computed_blocks(req)
    blocks = kv.allocate_slots(req, req.num_tokens - num_hit, hits)
    assert blocks is not None
    req.num_computed_tokens = req.num_tokens
    return num_hit


def test_hit_never_covers_the_whole_prompt(make_request):
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    _admit(kv, make_request("a", 8))
    # Same 8 tokens: both blocks cached, but the last token must be computed, so only 1 block hits.
    assert kv.get_computed_blocks(make_request("b", 8))[1] == 4
    assert kv.get_computed_blocks(make_request("c", 9))[1] == 8
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (8 + 8 + 9, 0 + 4 + 8)


def test_prompt_logprobs_and_disabled_cache_skip_lookup(make_request):
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    _admit(kv, make_request("a", 9))
    assert kv.get_computed_blocks(make_request("b", 9, prompt_logprobs=0)) == ([], 0)
    off = KVCacheManager(16, 4, enable_prefix_caching=False)
    _admit(off, make_request("a", 9))
    assert off.get_computed_blocks(make_request("b", 9)) == ([], 0)


def test_allocation_fails_cleanly_and_counts_free_hits(make_request):
    kv = KVCacheManager(4, 4, enable_prefix_caching=True)
    a = make_request("a", 9)
    _admit(kv, a)  # 3 blocks
    kv.free(a)  # all free; 2 full blocks stay cached
    b = make_request("b", 9 + 8)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    # 17 tokens need 5 blocks: 2 hits (both free, so they use free capacity) + 3 new > 4 free.
    assert kv.allocate_slots(b, b.num_tokens - num_hit, hits) is None
    assert kv.block_pool.get_num_free_blocks() == 4 and kv.get_block_ids(b) == []
    new = kv.allocate_slots(b, 4, hits)  # a chunk: 12 tokens, 3 blocks
    assert len(new) == 1 and kv.get_block_ids(b)[:2] == [h.block_id for h in hits]


def test_free_releases_tail_first(make_request):
    kv = KVCacheManager(8, 4, enable_prefix_caching=True)
    a = make_request("a", 12)
    _admit(kv, a)
    ids = kv.get_block_ids(a)
    kv.free(a)
    # The queue now holds the untouched blocks, then a's blocks tail first: its head goes last.
    order = [b.block_id for b in kv.block_pool.allocate(8)]
    assert order[-3:] == ids[::-1]
