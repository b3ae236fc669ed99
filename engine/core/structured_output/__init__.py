"""Structured outputs in the engine core: grammars compiled from a request's spec (compiler.py) and the
per-request matchers that mask each sampling row and advance on each sampled token (manager.py)."""
