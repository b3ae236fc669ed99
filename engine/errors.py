"""Errors every floor of the engine may raise or catch; a leaf module that imports nothing of ours."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The model executor can no longer run steps (a rank died, failed or timed out); the engine must restart."""
