"""The engine core: the step loop (schedule, execute, update), its process, its client and its messages."""
