"""The paged-KV engine: model runner, models, layers, sampling and the offline API."""
