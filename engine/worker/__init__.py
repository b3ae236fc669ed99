"""The worker: executors and TP ranks, the model runner (batch building, encoders), sampling."""
