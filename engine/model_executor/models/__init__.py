"""Model implementations and the registry that picks one from a checkpoint config."""
