"""Prefix-cache keys: a deterministic hash chain over full KV blocks (sha256, stable across processes).

A block's key covers its parent's key, its token ids and its extra keys (media content hashes),
so a cached prefix is reused only when everything before it, and the media in it, are identical.
"""

from __future__ import annotations

import hashlib

import msgspec

BlockHash = bytes
ExtraKeys = tuple  # msgpack-encodable items: str, bytes, int

_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(
    parent_hash: BlockHash | None, block_token_ids: list[int] | tuple[int, ...], extra_keys: ExtraKeys = ()
) -> BlockHash:
    """The key of one full block, chained on its parent's key (None for the first block)."""
    payload = _encoder.encode((parent_hash, tuple(block_token_ids), tuple(extra_keys)))
    return hashlib.sha256(payload).digest()
