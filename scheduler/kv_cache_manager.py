"""Per-request KV block tables on top of the BlockPool: prefix-cache lookup, slot allocation, freeing.

Hashes of blocks that become full are registered when they are scheduled: the runner writes a
layer's KV for the whole batch before attending, so even a hit in the same step reads valid KV.
"""

from __future__ import annotations

from omnistream.scheduler.block_pool import BlockPool, KVCacheBlock
from omnistream.scheduler.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks, enable_prefix_caching)
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_hashed_blocks: dict[str, int] = {}  # leading blocks of a table already registered
        # In tokens; a request the pool could not admit yet is counted again on its next try.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest chain of cached full blocks at the start of the request, and its token count.
        At least one token is always left to compute (it produces the next token's logits)."""
        if not self.block_pool.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes = request.update_block_hashes(self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[KVCacheBlock] | None = None
    ) -> list[KVCacheBlock] | None:
        """Make room for num_new_tokens after the request's computed tokens and the given prefix hits.
        Returns the newly allocated blocks, or None (and changes nothing) if the pool is too short."""
        hits = new_computed_blocks or []
        table = self._blocks.setdefault(request.request_id, [])
        if hits and table:
            raise ValueError(f"request {request.request_id}: prefix hits are only taken before its first block")
        num_total = request.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_needed = max(0, -(-num_total // self.block_size) - len(table) - len(hits))
        num_free_hits = sum(1 for block in hits if block.ref_cnt == 0)  # touching them uses free blocks
        if num_needed + num_free_hits > self.block_pool.get_num_free_blocks():
            if not table:
                del self._blocks[request.request_id]
            return None
        self.block_pool.touch(hits)
        new_blocks = self.block_pool.allocate(num_needed)
        table.extend(hits)
        table.extend(new_blocks)
        self._cache_full_blocks(request, table, num_total)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its last blocks are the first evicted."""
        table = self._blocks.pop(request.request_id, [])
        self._num_hashed_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(table))

    def truncate(self, request: Request, num_blocks: int) -> None:
        """Keep only the first num_blocks blocks of the request's table; the rest are freed, tail first
        (hashed ones stay in the prefix cache: their content still matches their hash)."""
        table = self._blocks.get(request.request_id, [])
        dropped = table[num_blocks:]
        del table[num_blocks:]
        if request.request_id in self._num_hashed_blocks:
            self._num_hashed_blocks[request.request_id] = min(self._num_hashed_blocks[request.request_id], num_blocks)
        self.block_pool.free_blocks(reversed(dropped))

    def get_block_ids(self, request: Request) -> list[int]:
        return [block.block_id for block in self._blocks.get(request.request_id, [])]

    def _cache_full_blocks(self, request: Request, table: list[KVCacheBlock], num_tokens: int) -> None:
        if not self.block_pool.enable_prefix_caching:
            return
        start = self._num_hashed_blocks.get(request.request_id, 0)
        end = num_tokens // self.block_size
        hashes = request.update_block_hashes(self.block_size)
        end = min(end, len(hashes))  # a block filled by a token still in flight is hashed once the token is known
        for block, block_hash in zip(table[start:end], hashes[start:end]):
            self.block_pool.cache_block(block, block_hash)
        self._num_hashed_blocks[request.request_id] = max(start, end)
