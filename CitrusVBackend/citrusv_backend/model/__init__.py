"""Citrus-V model: config, checkpoint loading, SAM2 support, the model, tokenizer and image processing."""
