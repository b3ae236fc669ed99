"""Requests, KV block accounting and the scheduling policy. Pure Python: never imports torch."""
