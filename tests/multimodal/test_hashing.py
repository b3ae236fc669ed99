import numpy as np
import torch

from omnistream.multimodal.hashing import hash_media


def test_content_and_params_change_the_hash():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    base = hash_media("image", a, height=32, width=64)
    assert base == hash_media("image", a.copy(), width=64, height=32)  # parameter order is irrelevant
    assert base == hash_media("image", torch.from_numpy(a), height=32, width=64)
    assert len(base) == 64
    others = {
        hash_media("video", a, height=32, width=64),
        hash_media("image", a.reshape(4, 3), height=32, width=64),
        hash_media("image", a.astype(np.float64), height=32, width=64),
        hash_media("image", a + 1, height=32, width=64),
        hash_media("image", a, height=64, width=64),
        hash_media("image", a.T, height=32, width=64),
    }
    assert base not in others and len(others) == 6


def test_bytes_split_is_unambiguous():
    assert hash_media("audio", b"ab", b"c") != hash_media("audio", b"a", b"bc")
    assert hash_media("audio", b"abc") == hash_media("audio", memoryview(b"abc"))
