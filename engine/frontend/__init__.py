"""The front-end engine: AsyncLLM, live sessions, admission, output processing and detokenizing (no model code)."""
