"""Attention backends behind one interface (torch SDPA on CPU; GPU backends slot in)."""
