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
        self._tables: dict[str, _BlockTable] = {}
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
        table = self._tables.get(request.request_id)
        num_total = request.num_computed_tokens + num_new_tokens
        # most decode steps: the last block has room, and no block became full that is not registered yet
        if (
            table is not None
            and not new_computed_blocks
            and num_total <= table.num_slots
            and (not self.block_pool.enable_prefix_caching or num_total // self.block_size <= table.num_hashed)
        ):
            return []
        hits = new_computed_blocks or []
        if hits and table is not None and table.blocks:
            raise ValueError(f"request {request.request_id}: prefix hits are only taken before its first block")
        num_held = 0 if table is None else len(table.blocks)
        num_total += len(hits) * self.block_size
        num_needed = max(0, -(-num_total // self.block_size) - num_held - len(hits))
        num_free_hits = sum(1 for block in hits if block.ref_cnt == 0)  # touching them uses free blocks
        if num_needed + num_free_hits > self.block_pool.get_num_free_blocks():
            return None
        if table is None:
            table = self._tables[request.request_id] = _BlockTable()
        self.block_pool.touch(hits)
        new_blocks = self.block_pool.allocate(num_needed)
        table.blocks.extend(hits)
        table.blocks.extend(new_blocks)
        table.num_slots = len(table.blocks) * self.block_size
        self._cache_full_blocks(request, table, num_total)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its last blocks are the first evicted."""
        table = self._tables.pop(request.request_id, None)
        if table is not None:
            self.block_pool.free_blocks(reversed(table.blocks))

    def truncate(self, request: Request, num_blocks: int) -> None:
        """Keep only the first num_blocks blocks of the request's table; the rest are freed, tail first
        (hashed ones stay in the prefix cache: their content still matches their hash)."""
        table = self._tables.get(request.request_id)
        if table is None:
            return
        dropped = table.blocks[num_blocks:]
        del table.blocks[num_blocks:]
        table.num_slots = len(table.blocks) * self.block_size
        table.num_hashed = min(table.num_hashed, num_blocks)
        self.block_pool.free_blocks(reversed(dropped))

    def get_block_ids(self, request: Request) -> list[int]:
        table = self._tables.get(request.request_id)
        return [] if table is None else [block.block_id for block in table.blocks]

    def _cache_full_blocks(self, request: Request, table: _BlockTable, num_tokens: int) -> None:
        if not self.block_pool.enable_prefix_caching:
            return
        start = table.num_hashed
        end = num_tokens // self.block_size
        hashes = request.update_block_hashes(self.block_size)
        end = min(end, len(hashes))  # a block filled by a token still in flight is hashed once the token is known
        for block, block_hash in zip(table.blocks[start:end], hashes[start:end]):
            self.block_pool.cache_block(block, block_hash)
        table.num_hashed = max(start, end)


class _BlockTable:
    """One request's blocks, the slots they hold, and how many leading blocks are registered in the prefix cache."""

    __slots__ = ("blocks", "num_hashed", "num_slots")

    def __init__(self) -> None:
        self.blocks: list[KVCacheBlock] = []
        self.num_slots = 0  # len(blocks) * block_size
        self.num_hashed = 0
