"""Causal language models (`model.task=causal_lm`): instruction tuning of any Hugging Face causal LM
through the framework's adapters and federated methods.

An example is an instruction, an optional input and a response (`dataset.instruction`,
`dataset.input`, `dataset.response` columns of a `dataset=hf` source), written into a prompt by
`dataset.template` (Alpaca's by default) and followed by the response and the end-of-text token.
A tokenized split is an int64 array (N, 3, L): token ids, attention mask, and the mask of the tokens
the loss is taken on (the response and the end token: the prompt is context, not a target), padded
on the right to L = model.max_length (longer examples are cut there). The loss is the mean
cross-entropy of each target token given those before it; the records' accuracy is the share of
target tokens predicted exactly (greedy), and the held-out perplexity is exp(loss).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.errors import ConfigError

# Alpaca's two prompts (Taori et al. 2023): with an input, and without one
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def prompt(instruction: str, given: str, template: str | None) -> str:
    """The prompt of an example: `template` with {instruction} and {input} filled in, or Alpaca's
    (its no-input form when the input is empty)."""
    if template is None:
        template = ALPACA if given else ALPACA_NO_INPUT
    return template.format(instruction=instruction, input=given)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of model '{path}': {str(e).splitlines()[0]}") from e
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise ConfigError(f"the tokenizer of model '{path}' has no end-of-text token (eos_token): a causal LM's "
                          "response needs one to end")
    return tokenizer, end


def tokenize_instructions(prompts: list[str], responses: list[str], tokenizer_path: str, max_length: int,
                          cache_dir: str | Path | None = None, source: str | None = None) -> np.ndarray:
    """(N, 3, max_length) int64: ids of prompt + response + end token, the attention mask, and the
    target mask (response and end token), cut at max_length and padded on the right; cached under a
    key of `source`, the tokenizer's files and max_length."""
    key = None
    if cache_dir is not None:
        tok_files = sorted(str(p) for p in Path(tokenizer_path).glob("*token*")) if Path(tokenizer_path).is_dir() else []
        what = source or [prompts, responses]
        key = hashlib.sha256(json.dumps(["causal", what, tokenizer_path, tok_files, max_length]).encode()).hexdigest()[:20]
        cached = Path(cache_dir) / f"tokens-{key}.npy"
        if cached.is_file():
            return np.load(cached)
    tokenizer, end = load_tokenizer(tokenizer_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    out = np.zeros((len(prompts), 3, max_length), np.int64)
    out[:, 0] = pad
    heads = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    tails = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    for i, (head, tail) in enumerate(zip(heads, tails)):
        ids = (list(head) + list(tail) + [end])[:max_length]
        out[i, 0, :len(ids)] = ids
        out[i, 1, :len(ids)] = 1
        out[i, 2, len(head):len(ids)] = 1  # the response and the end token, as far as they fit
    if key is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(cache_dir) / f"tokens-{key}.tmp.npy"
        np.save(tmp, out)
        tmp.replace(Path(cache_dir) / f"tokens-{key}.npy")
    return out


class CausalLM(nn.Module):
    """A Hugging Face causal LM that takes (B, 3, L) batches of ids, attention and target masks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The next-token logits (B, L', vocabulary), L' the batch's longest example."""
        longest = int(x[:, 1].sum(dim=1).max())  # padding is on the right: later columns change nothing
        x = x[:, :, :max(longest, 1)]
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits

    def scores(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
        """(summed cross-entropy of the target tokens, how many of them the model predicts exactly,
        how many there are): position t's logits predict token t + 1."""
        logits = self(x)
        length = logits.shape[1]
        ids, targets = x[:, 0, 1:length], x[:, 2, 1:length].bool()
        predicted = logits[:, :-1]
        loss = F.cross_entropy(predicted[targets], ids[targets], reduction="sum")
        correct = int((predicted[targets].argmax(-1) == ids[targets]).sum())
        return loss, correct, int(targets.sum())


def load_causal_lm(name: str, seed: int, num_layers: int | None = None) -> nn.Module:
    """A pretrained causal LM (a Hub id, or a local folder); `num_layers` keeps only the first layers."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from fedlora.hf import model_path

    extra = {"num_hidden_layers": num_layers} if num_layers else {}
    hf_logging.set_verbosity_error()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return AutoModelForCausalLM.from_pretrained(model_path(name), **extra)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load model '{name}' as a causal LM: {str(e).splitlines()[0]} (offline, give "
                              "model.hf a local folder)") from e
