"""The OpenAI-compatible HTTP server: `build_app(llm, args)` (engine/server/app.py) and `omnistream serve` (run.py)."""

from __future__ import annotations

from omnistream.engine.server.app import build_app

__all__ = ["build_app"]
