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

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedlora.errors import ConfigError
from fedlora.text import TextClassifier, cached_tokens, load_tokenizer

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


def _end_of(tokenizer, path: str) -> int:
    """The id of the token that ends a response: the tokenizer's end-of-text, else its separator."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise ConfigError(f"the tokenizer of model '{path}' has no end-of-text token (eos_token): a causal LM's "
                          "response needs one to end")
    return int(end)


def end_token(cfg) -> int:
    """The end token of the run's model."""
    from fedlora.hf import model_path

    path = model_path(cfg.model.hf)
    return _end_of(load_tokenizer(path), path)


def tokenize_instructions(prompts: list[str], responses: list[str], tokenizer_path: str, max_length: int,
                          cache_dir: str | Path | None = None, source: str | None = None) -> np.ndarray:
    """(N, 3, max_length) int64: ids of prompt + response + end token, the attention mask, and the
    target mask (response and end token), cut at max_length and padded on the right; cached under a
    key of `source` (or the texts)."""

    def make() -> np.ndarray:
        tokenizer = load_tokenizer(tokenizer_path)
        end = _end_of(tokenizer, tokenizer_path)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
        closing = {end, tokenizer.sep_token_id} - {None}

        def ids_of(texts: list[str]) -> list[list[int]]:
            """As a user's `tokenizer(text)` gives them (a leading BOS where the model has one), without a
            closing end or separator token."""
            out = []
            for ids in tokenizer(list(texts))["input_ids"]:
                while ids and ids[-1] in closing:
                    ids = ids[:-1]
                out.append(list(ids))
            return out

        # prompt and response tokenized together, as they are read; the prompt's own tokens say where
        # the response begins
        heads, wholes = ids_of(prompts), ids_of([p + r for p, r in zip(prompts, responses)])
        out = np.zeros((len(prompts), 3, max_length), np.int64)
        out[:, 0] = pad
        for i, (head, whole) in enumerate(zip(heads, wholes)):
            ids = (whole + [end])[:max_length]
            out[i, 0, :len(ids)] = ids
            out[i, 1, :len(ids)] = 1
            out[i, 2, min(len(head), len(ids)):len(ids)] = 1  # the response and the end token, as far as they fit
        return out

    return cached_tokens(["causal", source or [prompts, responses]], tokenizer_path, max_length, cache_dir, make)


class CausalLM(TextClassifier):
    """A Hugging Face causal LM that takes (B, 3, L) batches of ids, attention and target masks; its
    forward gives the next-token logits (B, L', vocabulary), L' the batch's longest example."""

    chunk = 8

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 4:  # packed rows (`pack`): no attention mask, the position ids keep examples apart
            return self.model(input_ids=x[:, 0], position_ids=x[:, 3], use_cache=False).logits
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits

    def scores(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
        """(summed cross-entropy of the target tokens, how many of them the model predicts exactly,
        how many there are): position t's logits predict token t + 1. Computed `chunk` examples at a
        time: a vocabulary's logits for a whole evaluation batch would not fit in memory."""
        loss, correct, count = 0.0, 0, 0
        for part in x.split(self.chunk):
            logits = self(part)
            length = logits.shape[1]
            ids, targets = part[:, 0, 1:length], part[:, 2, 1:length].bool()
            predicted = logits[:, :-1][targets]
            loss = loss + F.cross_entropy(predicted, ids[targets], reduction="sum")
            correct += int((predicted.argmax(-1) == ids[targets]).sum())
            count += int(targets.sum())
        return loss, correct, count


def pack(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, L) examples packed in their order into (M, 4, L) rows of at most L tokens, each row as
    many whole examples as fit: ids, attention, targets, and position ids that start again at 0 with
    each example (and with the padding at a row's end). Given position ids and no attention mask,
    Hugging Face's causal masks let a token see only its own example's earlier tokens (`check_packing`)."""
    length = x.shape[2]
    sizes = x[:, 1].sum(dim=1).tolist()
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if used + n > length and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    out = torch.zeros((len(rows), 4, length), dtype=x.dtype)
    padded = (x[:, 1] == 0).nonzero()
    if len(padded):  # the padding id of the examples
        out[:, 0] = x[padded[0, 0], 0, padded[0, 1]]
    steps = torch.arange(length, dtype=x.dtype)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = sizes[i]
            out[r, :3, at:at + n] = x[i, :, :n]
            out[r, 2, at] = 0  # as unpacked: no logits before an example's first token predict it
            out[r, 3, at:at + n] = steps[:n]
            at += n
        out[r, 3, at:] = steps[:length - at]
    return out


@torch.no_grad()
def check_packing(model: CausalLM, name: str) -> None:
    """Refuse model.packing for a model whose attention does not keep packed examples apart: two
    seeded sequences packed in one row must give the logits that each gives alone."""
    vocab = int(model.model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, vocab, (5,), generator=g), torch.randint(0, vocab, (7,), generator=g)
    model.eval()
    device = next(model.parameters()).device
    alone = [model.model(input_ids=s[None].to(device)).logits[0] for s in (first, second)]
    row = torch.cat([first, second])[None].to(device)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    packed = model.model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
    if not torch.allclose(packed, torch.cat(alone), atol=1e-4, rtol=1e-4):
        raise ConfigError(f"model.packing=true: model '{name}' lets a packed example see the one before it (its "
                          "attention does not take examples apart by their position ids): leave model.packing=false")


@torch.no_grad()
def exact_match(model: CausalLM, x: torch.Tensor, end: int, max_new_tokens: int,
                limit: int | None = None) -> tuple[float, int]:
    """(share, examples): of the first `limit` examples of `x` whose whole answer fits (the end token
    is in, and the response and end token are at most `max_new_tokens`), the share for which greedy
    generation from the prompt gives exactly the response's tokens, then the end token (one example
    at a time: no padding to get wrong); NaN when none fits."""
    model.eval()
    device = next(model.parameters()).device
    hits = total = 0
    for row in x:
        if limit is not None and total >= limit:
            break
        targets = row[2].nonzero().flatten()
        if len(targets) == 0 or int(row[0, targets[-1]]) != end or len(targets) > max_new_tokens:
            continue  # cut short at model.max_length, or longer than may be generated
        prompt_ids = row[0, :int(targets[0])][None].to(device)
        answer = row[0, targets].tolist()  # the response, then the end token
        out = model.model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                   max_new_tokens=len(answer), do_sample=False, pad_token_id=end, eos_token_id=end)
        hits += out[0, prompt_ids.shape[1]:].tolist() == answer
        total += 1
    return (hits / total if total else float("nan")), total
