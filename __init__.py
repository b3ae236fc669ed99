"""omnistream: a streaming-first serving engine for the Qwen3-Omni thinker.

The public offline API is re-exported here, lazily, so that importing the pure-Python
omnistream.scheduler never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "omnistream.engine.entrypoints.llm",
    "AsyncLLM": "omnistream.engine.frontend.async_llm",
    "RequestOutput": "omnistream.engine.frontend.outputs",
    "CompletionOutput": "omnistream.engine.frontend.outputs",
    "SamplingParams": "omnistream.scheduler.sampling_params",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'omnistream' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
