"""Text classification data: AG News read from its TSV files, tokenized once and cached.

A tokenized split is an int64 array (N, 2, L): token ids and attention mask, padded to L = max_length,
so that the training and evaluation loops index it like an image batch; `TextClassifier` turns such a
batch back into a Hugging Face call.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from fedlora.cache import write_atomic
from fedlora.errors import ConfigError, DataError

AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
AGNEWS_FILES = {"train": "dev.tsv", "test": "test.tsv"}


def read_agnews(root: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """(texts, labels 0..3) of AG News: `agnews/dev.tsv` for training, `agnews/test.tsv` for testing,
    each line `text<TAB>label`, labels by name."""
    path = Path(root) / "agnews" / AGNEWS_FILES[split]
    if not path.is_file():
        raise DataError(f"AG News: {path} does not exist; the data root must hold agnews/dev.tsv and "
                        "agnews/test.tsv (lines 'text<TAB>label')")
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if len(row) < 2 or row[-1] not in AGNEWS_LABELS:
                raise DataError(f"{path}, line {i}: expected 'text<TAB>label' with a label among {AGNEWS_LABELS}")
            texts.append("\t".join(row[:-1]))
            labels.append(AGNEWS_LABELS.index(row[-1]))
    return texts, np.array(labels, dtype=np.int64)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer of model '{path}': {str(e).splitlines()[0]}") from e


def cached_tokens(what, tokenizer_path: str, max_length: int, cache_dir: str | Path | None,
                  make: Callable[[], np.ndarray]) -> np.ndarray:
    """`make()`'s tokens, cached in `cache_dir` (when given) under a key of `what` (what the texts
    are), the tokenizer's files and max_length; written aside, then renamed (several actors may
    tokenize at once)."""
    if cache_dir is None:
        return make()
    tok_files = sorted(str(p) for p in Path(tokenizer_path).glob("*token*")) if Path(tokenizer_path).is_dir() else []
    key = hashlib.sha256(json.dumps([what, tokenizer_path, tok_files, max_length]).encode()).hexdigest()[:20]
    cached = Path(cache_dir) / f"tokens-{key}.npy"
    if cached.is_file():  # a copy-on-write map: the processes of a run share its pages (fedlora.cache.read_npz_mapped)
        return np.load(cached, mmap_mode="c")
    tokens = make()
    write_atomic(cached, lambda f: np.save(f, tokens))
    return tokens


def tokenize(texts: list[str], tokenizer_path: str, max_length: int, cache_dir: str | Path | None = None,
             source: Path | str | None = None, pairs: list[str] | None = None) -> np.ndarray:
    """Token ids and attention masks, (N, 2, max_length) int64, of the texts (with `pairs`, of each
    text and its pair, as the tokenizer joins sentence pairs). With `cache_dir`, cached under a key of
    the texts' source file (or a string that names them, or the texts themselves)."""
    if isinstance(source, Path):
        what = [str(source.resolve()), source.stat().st_size, source.stat().st_mtime_ns]
    else:
        what = source or [texts, pairs]

    def make() -> np.ndarray:
        tokenizer = load_tokenizer(tokenizer_path)
        tokenizer.padding_side = "right"  # TextClassifier drops the padding columns at the end
        enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, max_length=max_length,
                        padding="max_length", truncation=True, return_tensors="np")
        return np.stack([enc["input_ids"], enc["attention_mask"]], axis=1).astype(np.int64)

    return cached_tokens(what, tokenizer_path, max_length, cache_dir, make)


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier that takes (B, 2, L) batches of ids and masks (and further
    rows after them: `fedlora.causal.CausalLM`'s target masks)."""

    precision = "fp32"  # model.precision (fedlora.precision)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fedlora.precision import autocast

        # padding is on the right and masked: columns past the batch's longest text change nothing
        # but the time taken
        longest = int(x[:, 1].sum(dim=1).max())
        x = x[:, :, :max(longest, 1)]
        with autocast(x.device, self.precision):
            logits = self.logits(x)
        return logits.float()  # the loss in float32

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
