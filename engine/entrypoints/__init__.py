"""Entry points users call: the OpenAI HTTP server (+ Realtime), gRPC, the CLI, `omnistream serve` and `LLM`."""
