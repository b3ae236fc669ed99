"""Input processors: media to features, placeholders and TM-RoPE position ids (no model weights)."""
