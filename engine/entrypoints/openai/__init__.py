"""The OpenAI-compatible HTTP server (+ Realtime): `build_app(llm, args)` (app.py); `omnistream serve` runs it
(entrypoints/serve.py)."""

from __future__ import annotations

from omnistream.engine.entrypoints.openai.app import build_app

__all__ = ["build_app"]
