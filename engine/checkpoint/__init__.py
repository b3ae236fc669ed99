"""The checkpoint: the thinker config, the tokenizer and the embedded default model."""
