"""The Realtime API (`WS /v1/realtime`, GA events, text output) over the engine's live streaming sessions."""

from omnistream.engine.entrypoints.openai.realtime.connection import realtime_endpoint

__all__ = ["realtime_endpoint"]
