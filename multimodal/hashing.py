"""Content hashes of media items: the encoder-cache key and the input to prefix-cache block hashes.

A hash covers the content and every processing parameter that changes the features.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch


def _update(digest: "hashlib._Hash", tag: bytes, payload: bytes | memoryview) -> None:
    """Tag and length prefixes keep different splits of the same bytes apart."""
    digest.update(tag + len(payload).to_bytes(8, "little"))
    digest.update(payload)


Content = np.ndarray | torch.Tensor | bytes | bytearray | memoryview | str


def hash_media(modality: str, *contents: Content, **params: object) -> str:
    """sha256 hex of the modality, the content (arrays: dtype, shape and bytes) and the parameters (any order)."""
    digest = hashlib.sha256()
    _update(digest, b"m", modality.encode())
    for item in contents:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().contiguous().numpy()
        if isinstance(item, np.ndarray):
            _update(digest, b"a", f"{item.dtype.str}{item.shape}".encode())
            _update(digest, b"d", np.ascontiguousarray(item).reshape(-1).view(np.uint8).data)
        elif isinstance(item, str):
            _update(digest, b"s", item.encode())
        elif isinstance(item, (bytes, bytearray, memoryview)):
            _update(digest, b"b", memoryview(item).cast("B"))
        else:
            raise TypeError(f"hash_media: cannot hash content of type {type(item).__name__}")
    _update(digest, b"p", json.dumps(params, sort_keys=True, default=repr).encode())
    return digest.hexdigest()
