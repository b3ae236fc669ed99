"""The model executor: models, layers, attention backends, distributed groups and weight loading."""
