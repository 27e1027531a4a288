"""Image data sets as uint8 arrays, decoded once and cached.

Each data set is read from the first layout found under the data root:
- the offline layout of `shared/data` (`fashion-mnist/*.gz` IDX files, `cifar10/{train,test}.npz` JPEG
  archives; `cifar100/` and `svhn/` in the same layouts),
- torchvision's layout (what `torchvision.datasets.X(root, download=True)` writes),
and, with `data.download=true`, fetched through torchvision into the root. Decoded arrays are cached on
disk (`data.cache_dir`) and in memory, so a process decodes a data set at most once.
"""

from __future__ import annotations

import gzip
import logging
import hashlib
import io
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fedlora.cache import read_npz_mapped, save_atomic
from fedlora.errors import DataError

log = logging.getLogger("fedlora")


@dataclass(frozen=True)
class Split:
    inputs: np.ndarray  # images: uint8 (N, C, H, W); text: int64 token ids and masks (N, 2, L)
    labels: np.ndarray  # int64, (N,)
    groups: Optional[np.ndarray] = None  # partition=natural: each row's id of the client it belongs to


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    shape: Optional[tuple[int, int, int]]  # (C, H, W); None for text
    default_model: str  # the FedMUD paper's model for it; for text, a pretrained model
    mean: tuple[float, ...] = ()  # per channel, of the training images on the 0..1 scale
    std: tuple[float, ...] = ()

    @property
    def text(self) -> bool:
        return self.shape is None


DATASETS = {
    "fmnist": DatasetInfo(10, (1, 28, 28), "fmnist_cnn", (0.2860,), (0.3530,)),
    "svhn": DatasetInfo(10, (3, 32, 32), "svhn_cnn", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "cifar10": DatasetInfo(10, (3, 32, 32), "vgg_cifar", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(100, (3, 32, 32), "vgg_cifar", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "agnews": DatasetInfo(4, None, "minilm"),
    "hf": DatasetInfo(0, None, "minilm"),  # a user's own text data (fedlora.own_data): its classes are its labels'
}


def dataset_info(cfg) -> DatasetInfo:
    """The run's data set's classes and shapes: a built-in's, or those of the user's own (read)."""
    if cfg.dataset.name != "hf":
        return DATASETS[cfg.dataset.name]
    if cfg.model.get("task") == "causal_lm":  # one class: the tokens are the targets
        return DatasetInfo(1, None, "minilm")
    if cfg.dataset.get("labels") is not None and not cfg.dataset.get("image"):  # nothing to read
        return DatasetInfo(len(cfg.dataset.labels), None, "minilm")
    from fedlora.own_data import read_own

    data = read_own(cfg)
    if data.train_images is None:
        return DatasetInfo(len(data.label_names), None, "minilm")
    # their shape and their own statistics; the paper model for them is the one of their shape
    # (fedlora.models.model_for_shape, which model=auto takes)
    shape = tuple(int(d) for d in data.train_images.shape[1:])
    return DatasetInfo(len(data.label_names), shape, "", *data.image_stats)


def check_dataset(cfg) -> None:
    """Raise DataError, saying what is missing or wrong, when the run's data set cannot be read."""
    if cfg.dataset.name == "hf":
        from fedlora.own_data import read_own

        if cfg.data.get("on_nodes"):  # the nodes' own data: the server reads its test split, if any
            if cfg.dataset.path:
                read_own(cfg)
            return
        data = read_own(cfg)
        n = len(data.train_labels)
        if n < cfg.num_clients:
            raise DataError(f"dataset.path={cfg.dataset.path}: {n} training examples for num_clients={cfg.num_clients}; "
                            "every client needs at least one (fewer clients, or more data)")
        if cfg.partition.name == "label_count" and cfg.partition.classes_per_client > len(data.label_names):
            raise DataError(f"partition.classes_per_client={cfg.partition.classes_per_client}, and dataset.path="
                            f"{cfg.dataset.path} has {len(data.label_names)} classes")
        return
    check_available(cfg.dataset.name, cfg.data.root, cfg.data.download)

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _existing(path: Path) -> Optional[Path]:
    """The file itself or its .gz sibling, whichever exists."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            return candidate
    return None


def _damaged(path: Path, why: str) -> DataError:
    return DataError(f"{path} is damaged ({why}): download it again (Fashion-MNIST's files are at "
                     "https://github.com/zalandoresearch/fashion-mnist), or move it away and let torchvision fetch "
                     "the data set with data.download=true")


def _read_maybe_gz(path: Path) -> bytes:
    found = _existing(path)
    if found is None:
        raise FileNotFoundError(path)
    try:
        with (gzip.open if found.suffix == ".gz" else open)(found, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, or not gzip data at all
        raise _damaged(found, f"{type(e).__name__}: {e}") from e


def _idx_dir(root: Path) -> Optional[Path]:
    for d in (root / "fashion-mnist", root / "FashionMNIST" / "raw", root):  # the test files alone will do:
        if any(_existing(d / _FMNIST_FILES[s][0]) is not None for s in _FMNIST_FILES):  # a server, data.on_nodes
            return d
    return None


def _idx_payload(path: Path, header: int, item: int) -> np.ndarray:
    """An IDX file's items as uint8, after checking that it holds as many bytes as its header says."""
    data = _read_maybe_gz(path)
    count = int.from_bytes(data[4:8], "big") if len(data) >= 8 else -1
    if count < 0 or len(data) != header + count * item:
        raise _damaged(_existing(path), f"{len(data)} bytes where its header promises {header + max(count, 0) * item}")
    return np.frombuffer(data, np.uint8, offset=header)


def _load_idx(d: Path, split: str) -> Split:
    img_name, lbl_name = _FMNIST_FILES[split]
    images = _idx_payload(d / img_name, 16, 28 * 28).reshape(-1, 1, 28, 28)
    labels = _idx_payload(d / lbl_name, 8, 1).astype(np.int64)
    return Split(images.copy(), labels)


def _jpeg_npz_dir(root: Path, name: str) -> Optional[Path]:
    # one split will do: a deployed node's own data (`local-data`) has no test split, a server under
    # data.on_nodes no training split
    d = root / name
    return d if (d / "train.npz").exists() or (d / "test.npz").exists() else None


def _load_jpeg_npz(d: Path, split: str) -> Split:
    from PIL import Image

    with np.load(d / f"{split}.npz") as z:
        data, offsets, labels = z["data"], z["offsets"], z["labels"]
    images = np.stack(
        [np.asarray(Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
         for i in range(len(offsets) - 1)]
    )
    return Split(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels.astype(np.int64))


def _torchvision(name: str, root: Path, split: str, download: bool) -> Split:
    import torchvision.datasets as tvd

    train = split == "train"
    if name == "fmnist":
        ds = tvd.FashionMNIST(str(root), train=train, download=download)
        return Split(ds.data.numpy()[:, None].copy(), ds.targets.numpy().astype(np.int64))
    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        ds = cls(str(root), train=train, download=download)
        return Split(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, np.int64))
    ds = tvd.SVHN(str(root / "svhn") if (root / "svhn").is_dir() else str(root), split=split, download=download)
    return Split(np.ascontiguousarray(ds.data), np.asarray(ds.labels, np.int64))


_TORCHVISION_MARKERS = {
    "fmnist": ["FashionMNIST/raw/train-images-idx3-ubyte"],
    "cifar10": ["cifar-10-batches-py/data_batch_1"],
    "cifar100": ["cifar-100-python/train"],
    "svhn": ["train_32x32.mat", "svhn/train_32x32.mat"],
}

_EXPECTED = {
    "fmnist": "fashion-mnist/ with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
              "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (or torchvision's FashionMNIST/raw/)",
    "cifar10": "cifar10/ with train.npz and test.npz (JPEG archives) (or torchvision's cifar-10-batches-py/)",
    "cifar100": "cifar100/ with train.npz and test.npz (JPEG archives) (or torchvision's cifar-100-python/)",
    "svhn": "svhn/ with train_32x32.mat and test_32x32.mat (or torchvision's train_32x32.mat in the root)",
    "agnews": "agnews/ with dev.tsv (training) and test.tsv (lines 'text<TAB>label')",
}


Source = tuple[list[Path], Callable[[str], Split]]


def _find_source(name: str, root: Path, download: bool = False) -> Optional[Source]:
    """(the files read, a loader of a split) for the first layout found under root, or None. With
    download, torchvision's layout is used and fetched split by split as needed."""
    if name == "fmnist" and (d := _idx_dir(root)) is not None:
        files = [_existing(d / f) for pair in _FMNIST_FILES.values() for f in pair]
        return [f for f in files if f is not None], lambda split: _load_idx(d, split)
    if name in ("cifar10", "cifar100", "svhn") and (d := _jpeg_npz_dir(root, name)) is not None:
        return [p for p in (d / "train.npz", d / "test.npz") if p.exists()], lambda split: _load_jpeg_npz(d, split)
    markers = [root / m for m in _TORCHVISION_MARKERS[name] if (root / m).exists()]
    if download or markers:
        return markers, lambda split: _torchvision(name, root, split, download=download)
    return None


def _cache_name(name: str, split: str, files: list[Path]) -> str:
    """Named after the source files' paths, sizes and modification times: changed files, new entry."""
    stats = sorted(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return f"{name}-{split}-{hashlib.sha1('|'.join(stats).encode()).hexdigest()[:12]}.npz"


def check_available(name: str, root: Optional[str], download: bool) -> None:
    """Raise DataError, saying where the files are expected and how to get them, when the data set
    cannot be read or fetched."""
    how = f"Set data.root=PATH (or the FEDLORA_DATA environment variable) to a folder holding {_EXPECTED[name]}"
    how += "." if DATASETS[name].text else "; or add data.download=true to fetch it with torchvision (needs internet)."
    if root is None:
        if download:
            raise DataError("data.download=true needs a data.root to download into. " + how)
        raise DataError(f"no data root is set for dataset '{name}'. " + how)
    path = Path(root)
    if DATASETS[name].text:  # test.tsv alone will do for a server under data.on_nodes (dev.tsv: a node's)
        if not ((path / "agnews" / "dev.tsv").is_file() or (path / "agnews" / "test.tsv").is_file()):
            raise DataError(f"dataset '{name}' not found under {path}. " + how)
        return
    if download:
        return
    if not path.is_dir():
        raise DataError(f"data root {path} does not exist. " + how)
    if _find_source(name, path) is None:
        raise DataError(f"dataset '{name}' not found under {path}. " + how)


def default_cache_dir() -> Path:
    from fedlora.paths import absolute

    return Path(absolute(os.environ.get("FEDLORA_CACHE", "~/.cache/fedlora"), "FEDLORA_CACHE"))


@lru_cache(maxsize=8)
def load_split(name: str, root: str, split: str, download: bool = False, cache_dir: Optional[str] = None) -> Split:
    """Decoded split of a data set, from memory, the disk cache, or the source files (in that order)."""
    check_available(name, root, download)
    files, loader = _find_source(name, Path(root), download)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cached = cache / _cache_name(name, split, files)
    if files and cached.exists():
        try:
            try:
                arrays = read_npz_mapped(cached)
            except OSError:  # no map to be had (a limit on memory or maps): read into memory
                with np.load(cached) as z:
                    arrays = {k: z[k] for k in z.files}
            return Split(arrays["images"], np.array(arrays["labels"]))  # the labels, small, in memory
        except (zipfile.BadZipFile, ValueError, KeyError, struct.error, EOFError):  # damaged: decoded, written again
            cached.unlink(missing_ok=True)
    try:
        data = loader(split)
    except (OSError, RuntimeError, ValueError) as e:
        action = "download" if download else "read"
        raise DataError(f"could not {action} the {split} split of '{name}' under {root}: {e}") from e
    if not files:  # fetched just now: name the entry after the files that are there now
        files, _ = _find_source(name, Path(root), download)
        cached = cache / _cache_name(name, split, files)
    try:
        save_atomic(cached, images=data.inputs, labels=data.labels)
    except OSError:
        pass  # a read-only cache only costs a second decode later
    return data


def subset_indices(n: int, size: Optional[int], seed: int) -> np.ndarray:
    """Sorted seeded random subset of range(n) of the given size (all of it when size is None)."""
    if size is None or size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False))


def _load_text(cfg, split: str) -> Split:
    from fedlora.hf import model_path
    from fedlora.text import AGNEWS_FILES, read_agnews, tokenize

    texts, labels = read_agnews(cfg.data.root, split)
    source = Path(cfg.data.root) / "agnews" / AGNEWS_FILES[split]
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    return Split(tokenize(texts, model_path(cfg.model.hf), cfg.model.max_length, cache, source), labels)


def has_dataset(name: str, root: Optional[str]) -> bool:
    """Whether the data set can be read under root as it is (no download)."""
    try:
        check_available(name, root, download=False)
    except DataError:
        return False
    return True


def load_own(cfg, split: str, role: str | None = None) -> Split:
    """A split of one's own data (dataset=hf), tokenized for the run's model: of the run's data
    set, or (role=node) of a node's own local-data at dataset.path (`fedlora.own_data.read_own`)."""
    from fedlora.hf import model_path
    from fedlora.own_data import read_own
    from fedlora.text import tokenize

    data = read_own(cfg, role)
    train = split == "train"
    texts, labels = (data.train_texts, data.train_labels) if train else (data.test_texts, data.test_labels)
    groups = data.train_groups if train else None
    if data.train_images is not None:
        return Split(data.train_images if train else data.test_images, labels, groups)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    if cfg.model.get("task") == "causal_lm":  # texts are (prompts, responses)
        from fedlora.causal import tokenize_instructions

        tokens = tokenize_instructions(list(texts[0]), list(texts[1]), model_path(cfg.model.hf), cfg.model.max_length,
                                       cache, f"{data.source}-{split}")
        empty = int((tokens[:, 2].sum(axis=1) == 0).sum())
        if empty == len(tokens):
            raise DataError(f"dataset.path={cfg.dataset.path}: at model.max_length={cfg.model.max_length} no {split} "
                            "example keeps a token of its response (the prompts fill it): raise model.max_length")
        if empty:
            log.warning("%d of the %d %s examples lose their whole response at model.max_length=%d: they teach "
                        "nothing", empty, len(tokens), split, cfg.model.max_length)
        return Split(tokens, labels, groups)
    tokens = tokenize(list(texts[0]), model_path(cfg.model.hf), cfg.model.max_length, cache, f"{data.source}-{split}",
                      pairs=list(texts[1]) if len(texts) > 1 else None)
    return Split(tokens, labels, groups)


def load_full(cfg, split: str) -> Split:
    """A whole split of the config's data set under cfg.data.root (or at dataset.path: dataset=hf)."""
    if cfg.dataset.name == "hf":
        return load_own(cfg, split)
    if DATASETS[cfg.dataset.name].text:
        return _load_text(cfg, split)
    return load_split(cfg.dataset.name, cfg.data.root, split, cfg.data.download, cfg.data.cache_dir)


def load_test(cfg) -> Split | None:
    """The test split alone, with the config's seeded subset (data.on_nodes: the server has no
    training data); None where there is none (dataset=hf without dataset.path)."""
    if cfg.dataset.name == "hf" and not cfg.dataset.path:
        return None
    test = load_full(cfg, "test")
    te = subset_indices(len(test.labels), cfg.data.test_samples, cfg.seed + 1)
    return Split(test.inputs[te], test.labels[te]) if len(te) < len(test.labels) else test


def load_train_test(cfg) -> tuple[Split, Split]:
    """The training and test splits a run uses, with the config's seeded subsets applied."""
    train = load_full(cfg, "train")
    tr = subset_indices(len(train.labels), cfg.data.train_samples, cfg.seed)
    if len(tr) < len(train.labels):
        train = Split(train.inputs[tr], train.labels[tr], None if train.groups is None else train.groups[tr])
    return train, load_test(cfg)


def to_tensors(split: Split, dataset: str | DatasetInfo,
               indices: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float32 images (or int64 tokens) and int64 labels (optionally only the given rows), of
    a built-in data set by name, or of any by its info (`dataset_info`)."""
    images, labels = split.inputs, split.labels
    if indices is not None:
        images, labels = images[indices], labels[indices]
    info = DATASETS[dataset] if isinstance(dataset, str) else dataset
    if info.text:
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.ascontiguousarray(labels)).long()
    mean, std = info.mean, info.std
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    x.sub_(torch.tensor(mean).view(1, -1, 1, 1)).div_(torch.tensor(std).view(1, -1, 1, 1))
    return x, torch.from_numpy(np.ascontiguousarray(labels)).long()
