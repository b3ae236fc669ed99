"""The paged-KV engine, in floors that follow a request: entrypoints (HTTP, Realtime, gRPC, CLI, LLM) → frontend
(AsyncLLM, sessions, outputs) → core (the step loop and its process) → worker (runner, sampler, TP ranks) →
model_executor (models, layers, attention, loading) → checkpoint (config, tokenizer, default model). A module imports
only from its own floor or below (tests/test_import_layers.py)."""
