"""Inference on top of the Citrus-V model: prompts, generation and parsing of the model's answers."""
