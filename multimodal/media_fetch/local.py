"""Local media files (file:// URLs and bare paths) for a server: only regular files under the allowed
directory once symlinks and `..` are resolved, read under the byte cap."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from omnistream.multimodal.media_fetch.errors import MediaTooLargeError, MediaURLNotAllowed


def read_local(url: str, modality: str, root: Path | None, max_bytes: int) -> bytes:
    """The bytes of a file:// URL or a path (a relative one is taken under `root`, itself fully resolved)."""
    if root is None:
        raise MediaURLNotAllowed(f"{modality}: local media files are not read by this server "
                                 "(--allowed-local-media-path is not set)")
    refused = MediaURLNotAllowed(f"{modality}: the local media file does not exist or is not under "
                                 "--allowed-local-media-path")
    try:
        path = (root / _path_of(url, modality)).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # null bytes, symlink loops
        raise refused from exc
    if not path.is_relative_to(root):
        raise refused
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise refused from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refused
        if info.st_size > max_bytes:
            raise MediaTooLargeError(modality, max_bytes, info.st_size)
        data = _read_up_to(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise MediaTooLargeError(modality, max_bytes)
    return data


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, min(limit - size, 1 << 20))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _path_of(url: str, modality: str) -> Path:
    if url[:5].lower() != "file:":
        return Path(url)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaURLNotAllowed(f"{modality}: a file:// URL must name a local file (file:///path)")
    return Path(unquote(parts.path))
