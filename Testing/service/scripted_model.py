"""A tiny Citrus-V that writes a chosen answer, so the reference clients' replays see the answers they are made for.

The random tiny model writes noise, which no client parses into a mask. This one is the same checkpoint with its
language layers silenced (attention and MLP outputs zero: the last hidden state is the current token's
embedding) and a bigram table in its embeddings and head: the embedding of the i-th answer token is a one-hot
in dimension i, and the head maps dimension i to the (i+1)-th token. Greedy decoding after any prompt, which
ends with "assistant\\n", then writes exactly the answer and `<|im_end|>` — a real `generate`, token by token,
through the whole model, the [SEG] state included (its embedding keeps a random part, so SAM2 gets a
non-degenerate prompt). Each answer token must be distinct (the table has one successor per token).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LANGUAGE = "mllm.model.language_model."
NEWLINE, IM_END = 198, 151645
SCALE, GAIN = 10.0, 50.0
SCRIPTED_ANSWER = "Sure, it is [SEG]."  # what the reference's segmentation answers look like (its paper's figure)


def make_scripted_checkpoint(tiny_checkpoint: Path, directory: Path, answer: str, seed: int = 0) -> Path:
    """A copy of `tiny_checkpoint` (written by `make_tiny_checkpoint`) in `directory`, scripted to write `answer`."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_checkpoint, directory)
    tokens = AutoTokenizer.from_pretrained(str(directory)).encode(answer, add_special_tokens=False)
    chain = [NEWLINE, *tokens]               # each token's successor: the next one, the last one's <|im_end|>
    successors = [*tokens, IM_END]
    assert len(set(chain)) == len(chain), f"{answer!r}: every token must be distinct for a bigram script"
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        path = directory / shard
        weights = load_file(str(path))
        for name, tensor in weights.items():
            if name.startswith(LANGUAGE + "layers.") and name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                tensor.zero_()
            elif name == LANGUAGE + "norm.weight":
                tensor.fill_(1.0)
            elif name == LANGUAGE + "embed_tokens.weight":
                _script_embeddings(tensor, chain, seed)
            elif name == "mllm.lm_head.weight":
                tensor[:, : len(chain)] = 0.0
                for dimension, token in enumerate(successors):
                    tensor[token].zero_()
                    tensor[token, dimension] = GAIN
        save_file(weights, str(path), metadata={"format": "pt"})
    return directory


def _script_embeddings(embeddings: torch.Tensor, chain: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for dimension, token in enumerate(chain):
        row = torch.zeros(embeddings.shape[1])
        row[dimension] = SCALE
        if token != NEWLINE:  # a random part outside the script's dimensions: a non-degenerate [SEG] state
            row[len(chain):] = torch.randn(embeddings.shape[1] - len(chain), generator=generator)
        embeddings[token] = row
