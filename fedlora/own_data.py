"""A user's own text classification data (`dataset=hf`), read through Hugging Face `datasets`.

`dataset.path` is one of:
- a local file: CSV (`.csv`), TSV (`.tsv`), JSON lines (`.jsonl`, `.json`) or Parquet (`.parquet`),
  which holds one split (`train`): the test split is then a seeded hold-out of it;
- a local folder: one that `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote, or one of
  such files, whose names give the splits as `datasets` reads them (`train.csv`, `test.csv`, ...);
- a Hugging Face Hub id (`ag_news`, `glue` with `dataset.subset=sst2`), which needs internet.

`dataset.text` names the text column, or two of them for sentence pairs (GLUE's);
`dataset.label` the label column. Classes come from the label column's `ClassLabel` names, else from
its values: integers and strings alike are mapped to ids in their sorted order (integers 0..K-1 stay
as they are), and the names are written to the run's summary (`labels`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedlora.errors import DataError

# a TSV's fields are not quoted: a quotation mark in a text is part of it
FILE_FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
                ".jsonl": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {})}


@dataclass(frozen=True)
class OwnData:
    """The splits as texts (one list per text column) and label ids, and the class names."""

    train_texts: tuple[tuple[str, ...], ...]
    train_labels: np.ndarray
    test_texts: tuple[tuple[str, ...], ...]
    test_labels: np.ndarray
    label_names: tuple[str, ...]
    source: str  # what was read, for the cache key of the tokens


def _text_columns(dcfg) -> list[str]:
    text = dcfg.text
    columns = [text] if isinstance(text, str) else list(text)
    if not 1 <= len(columns) <= 2:
        raise DataError(f"dataset.text names one text column, or two for sentence pairs (got {list(columns)})")
    return columns


def looks_local(path: str) -> bool:
    """Whether dataset.path names a local file or folder (else it is a Hub id)."""
    return path.startswith(("/", ".", "~")) or Path(path).suffix.lower() in FILE_FORMATS


def _load(dcfg):
    """The `datasets` DatasetDict (or Dataset) at dataset.path."""
    import datasets

    path = str(dcfg.path)
    local = Path(path)
    try:
        if local.is_file():
            if local.suffix.lower() not in FILE_FORMATS:
                raise DataError(f"dataset.path={path}: a file must be one of {', '.join(FILE_FORMATS)} (CSV, TSV, "
                                "JSON lines, Parquet), or give a folder")
            builder, options = FILE_FORMATS[local.suffix.lower()]
            return datasets.load_dataset(builder, data_files={"train": str(local)}, **options)
        if local.is_dir():
            if (local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file():
                return datasets.load_from_disk(str(local))
            return datasets.load_dataset(str(local))
        if looks_local(path):
            raise DataError(f"dataset.path={path} does not exist (a local file or folder was expected)")
        return datasets.load_dataset(path, dcfg.get("subset"))
    except DataError:
        raise
    except (ConnectionError, OSError) as e:
        raise DataError(f"dataset.path={path} is not a local file or folder, and as a Hugging Face Hub id it needs "
                        f"internet ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a local "
                        "path, or run where the Hub can be reached") from e
    except ValueError as e:
        if "corresponds to no data" in str(e):  # a file of a header alone
            raise DataError(f"dataset.path={path} holds no rows") from e
        raise DataError(f"dataset.path={path} could not be read by datasets: {str(e).splitlines()[0]}") from e
    except Exception as e:  # what `datasets` raises for a file it cannot parse, a folder it cannot read
        raise DataError(f"dataset.path={path} could not be read by datasets: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _split(ds, name: str, path: str):
    import datasets

    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    if name not in ds:
        raise DataError(f"dataset.path={path} has no split '{name}'; it has: {', '.join(ds)}")
    return ds[name]


def _columns(split, columns: list[str], path: str, which: str) -> list[list]:
    missing = [c for c in columns if c not in split.column_names]
    if missing:
        raise DataError(f"dataset.path={path}, split '{which}': no column {missing[0]!r}; its columns: "
                        f"{', '.join(split.column_names)} (set dataset.text and dataset.label)")
    return [split[c] for c in columns]


def _label_ids(train: list, test: list, feature, path: str, column: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Label ids of both splits and the class names: a ClassLabel's, or the sorted values'."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return np.asarray(train, np.int64), np.asarray(test, np.int64), tuple(feature.names)
    values = set(train) | set(test)
    kinds = {type(v) for v in values}
    if None in values or not (kinds <= {int} or kinds <= {str}):
        shown = sorted({type(v).__name__ for v in values})
        raise DataError(f"dataset.path={path}: the label column {column!r} holds {', '.join(shown)} values; labels "
                        "must be integers or strings (each distinct value a class)")
    order = sorted(values)
    index = {v: i for i, v in enumerate(order)}
    return (np.array([index[v] for v in train], np.int64), np.array([index[v] for v in test], np.int64),
            tuple(str(v) for v in order))


def _holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from fedlora.seeds import derive_seed

    held = max(1, round(fraction * n))
    order = np.random.default_rng(derive_seed(seed, "test-holdout")).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


@lru_cache(maxsize=4)
def _read(key: str) -> OwnData:
    spec = json.loads(key)
    from omegaconf import OmegaConf

    dcfg = OmegaConf.create(spec["dataset"])
    path, columns = str(dcfg.path), _text_columns(dcfg)
    ds = _load(dcfg)
    train = _split(ds, dcfg.train_split, path)
    label = str(dcfg.label)
    if dcfg.test_split is not None:
        test = _split(ds, dcfg.test_split, path)
        train_cols = _columns(train, columns + [label], path, dcfg.train_split)
        test_cols = _columns(test, columns + [label], path, dcfg.test_split)
    else:  # a seeded hold-out of the training split
        cols = _columns(train, columns + [label], path, dcfg.train_split)
        if len(cols[0]) < 2:
            raise DataError(f"dataset.path={path}: split '{dcfg.train_split}' has {len(cols[0])} examples, too few "
                            "to hold some out for testing")
        keep, held = _holdout(len(cols[0]), float(dcfg.test_fraction), int(spec["seed"]))
        train_cols = [[c[i] for i in keep] for c in cols]
        test_cols = [[c[i] for i in held] for c in cols]
    for name, cols in ((dcfg.train_split, train_cols), (dcfg.test_split or "held-out", test_cols)):
        if not cols[0]:
            raise DataError(f"dataset.path={path}: split '{name}' is empty")
        for column, values in zip(columns, cols):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise DataError(f"dataset.path={path}, split '{name}', row {bad}: the text column {column!r} holds "
                                f"{type(values[bad]).__name__} {values[bad]!r}, not text")
    y_train, y_test, names = _label_ids(train_cols[-1], test_cols[-1], train.features[label], path, label)
    local = Path(path)
    if local.exists():
        files = sorted(p for p in ([local] if local.is_file() else local.rglob("*")) if p.is_file())
        source = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    else:
        source = path
    return OwnData(tuple(tuple(c) for c in train_cols[:-1]), y_train, tuple(tuple(c) for c in test_cols[:-1]),
                   y_test, names, hashlib.sha256((source + key).encode()).hexdigest()[:20])


def read_own(cfg) -> OwnData:
    """The run's own data set, read once per process and config."""
    from omegaconf import OmegaConf

    return _read(json.dumps({"dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "seed": cfg.seed},
                            sort_keys=True))
