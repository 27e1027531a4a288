"""A user's own text data (`dataset=hf`), read through Hugging Face `datasets`: texts and labels for
classification, or instructions and responses for a causal LM (`model.task=causal_lm`, fedlora/causal.py).

`dataset.path` is one of:
- a local file: CSV (`.csv`), TSV (`.tsv`), JSON lines (`.jsonl`, `.json`) or Parquet (`.parquet`),
  which holds one split (`train`): the test split is then a hold-out of it (the same rows whatever
  the run's seed);
- a local folder: one that `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote, or one of
  such files, whose names give the splits as `datasets` reads them (`train.csv`, `test.csv`, ...);
- a Hugging Face Hub id (`ag_news`, `glue` with `dataset.subset=sst2`), which needs internet.

`dataset.text` names the text column, or two of them for sentence pairs (GLUE's), or `dataset.image`
an image column (a folder of one sub-folder of images per class reads as `image` and `label`);
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
    train_groups: np.ndarray | None = None  # partition=natural: each training row's id of its column's value
    train_images: np.ndarray | None = None  # dataset.image: uint8 (N, C, H, W), the texts then empty
    test_images: np.ndarray | None = None
    image_stats: tuple | None = None  # the training images' per-channel (mean, std), 0..1


def _text_columns(dcfg) -> list[str]:
    """dataset.text as a list (one or two columns: fedlora.config checks it)."""
    return [dcfg.text] if isinstance(dcfg.text, str) else list(dcfg.text)


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


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
        if local.exists():  # an empty folder, one that datasets finds nothing in
            raise DataError(f"dataset.path={path} holds nothing that datasets reads ({type(e).__name__}: "
                            f"{_first_line(e)}): give CSV, TSV, JSON-lines or Parquet files, "
                            "or a save_to_disk folder") from e
        raise DataError(f"dataset.path={path} is not a local file or folder, and as a Hugging Face Hub id it needs "
                        f"internet ({type(e).__name__}: {_first_line(e)}); give a local "
                        "path, or run where the Hub can be reached") from e
    except ValueError as e:
        if "corresponds to no data" in str(e):  # a file of a header alone
            raise DataError(f"dataset.path={path} holds no rows") from e
        raise DataError(f"dataset.path={path} could not be read by datasets: {_first_line(e)}") from e
    except Exception as e:  # what `datasets` raises for a file it cannot parse, a folder it cannot read
        raise DataError(f"dataset.path={path} could not be read by datasets: {type(e).__name__}: "
                        f"{_first_line(e)}") from e


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
                        f"{', '.join(split.column_names)} (set dataset.text or dataset.image, and dataset.label; for "
                        "model.task=causal_lm dataset.instruction, dataset.input and dataset.response)")
    return [split[c] for c in columns]


def _label_ids(train: list, test: list, train_feature, test_feature, path: str,
               column: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Label ids of both splits and the class names: a ClassLabel's, or the sorted values' (every
    test label must be a training one)."""
    import datasets

    if isinstance(train_feature, datasets.ClassLabel):
        names = tuple(train_feature.names)
        if isinstance(test_feature, datasets.ClassLabel) and tuple(test_feature.names) != names:
            raise DataError(f"dataset.path={path}: the splits' label column {column!r} names its classes differently "
                            f"({list(names)[:5]} and {list(test_feature.names)[:5]})")
        y_train, y_test = np.asarray(train, np.int64), np.asarray(test, np.int64)
        outside = sorted({int(v) for v in y_test if not 0 <= v < len(names)} | {int(v) for v in y_train if v < 0})
        if outside:
            raise DataError(f"dataset.path={path}: label {outside[0]} is none of the {len(names)} classes (-1 marks an "
                            "unlabelled row, as in a Hub data set's test split): choose a labelled test split, e.g. "
                            "dataset.test_split=validation, or none (a hold-out of the training split)")
    else:
        values = set(train) | set(test)
        _check_kinds(values, path, column)
        unseen = sorted(set(test) - set(train), key=str)
        if unseen:
            raise DataError(f"dataset.path={path}: the test split's label {unseen[0]!r} is in no training example, so "
                            "no model can learn it (an unlabelled test split? choose a labelled one, or none)")
        order = sorted(values)
        index = {v: i for i, v in enumerate(order)}
        names = tuple(str(v) for v in order)
        y_train = np.array([index[v] for v in train], np.int64)
        y_test = np.array([index[v] for v in test], np.int64)
    _two_classes(y_train, path, column)
    return y_train, y_test, names


def _two_classes(y_train: np.ndarray, path: str, column: str) -> None:
    if len(set(y_train.tolist())) < 2:
        raise DataError(f"dataset.path={path}: the training labels ({column!r}) hold {len(set(y_train.tolist()))} "
                        "class; classification needs two or more")


def _check_kinds(values: set, path: str, column: str) -> None:
    kinds = {type(v) for v in values}
    if None in values or not (kinds <= {int} or kinds <= {str}):
        shown = sorted({type(v).__name__ for v in values})
        raise DataError(f"dataset.path={path}: the label column {column!r} holds {', '.join(shown)} values; "
                        "labels must be integers or strings (each distinct value a class)")


def _named_ids(values: list, feature, names: tuple[str, ...], path: str, column: str, which: str) -> np.ndarray:
    """Label ids of a split under the run's class names (dataset.labels, or those the server sends a
    node with its own data): each value, or its ClassLabel name, as text, must be one of them."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        values = [feature.names[v] if 0 <= v < len(feature.names) else v for v in values]
    else:
        _check_kinds(set(values), path, column)
    index = {n: i for i, n in enumerate(names)}
    ids = [index.get(str(v)) for v in values]
    bad = next((i for i, v in enumerate(ids) if v is None), None)
    if bad is not None:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise DataError(f"dataset.path={path}, split '{which}', row {bad}: label {values[bad]!r} is none of the run's "
                        f"{len(names)} classes ({shown}); dataset.labels names them all, in order")
    return np.asarray(ids, np.int64)


def _holdout(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) rows: the same for every run seed, so that runs of different seeds are
    tested on the same examples."""
    from fedlora.seeds import derive_seed

    held = max(1, round(fraction * n))
    order = np.random.default_rng(derive_seed("test-holdout")).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def _texts(split, columns: list[str], path: str, which: str, optional: str | None = None) -> list[list]:
    """The columns of a split, each row's text checked (`optional`: a column that may be missing or
    hold nulls, as an instruction's input)."""
    present = [c for c in columns if c != optional or c in split.column_names]
    values = dict(zip(present, _columns(split, present, path, which)))
    n = len(split)
    if optional is not None:
        values[optional] = [v or "" for v in values.get(optional, [""] * n)]
    for column, col in values.items():
        bad = next((i for i, v in enumerate(col) if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"dataset.path={path}, split '{which}', row {bad}: the column {column!r} holds "
                            f"{type(col[bad]).__name__} {col[bad]!r}, not text")
    return [values[c] for c in columns]


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _decode(item):
    """A PIL image from what `datasets` holds undecoded (bytes, or a path)."""
    import io

    from PIL import Image

    if isinstance(item, dict) and (item.get("bytes") or item.get("path")):
        return Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
    return item


def _pixels(img, grey: bool) -> np.ndarray:
    """uint8 pixels of one image, grey (H, W) or RGB (H, W, 3): 16- and 32-bit grey scaled to 0..255."""
    if img.mode in ("I", "I;16", "F"):
        a = np.asarray(img, np.float64)
        top = 65535.0 if img.mode != "F" or a.max() > 1.0 else 1.0
        a = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        return a if grey else np.stack([a] * 3, axis=-1)
    return np.asarray(img.convert("L" if grey else "RGB"))


def is_grey(img) -> bool:
    """A grey image: in a grey mode, or a palette image whose colours are all grey."""
    if img.mode in GREY_MODES:
        return True
    if img.mode == "P":
        rgb = np.asarray(img.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def _images(items: list, path: str, which: str, grey: bool, size: int | None) -> np.ndarray:
    """uint8 (N, C, H, W) of the images, decoded one at a time (only the resized pixels are kept): grey
    (C = 1) or RGB, resized to size x size when given (else they must all have one size)."""
    from PIL import Image

    arrays = []
    for i, item in enumerate(items):
        img = _decode(item)
        if not isinstance(img, Image.Image):
            raise DataError(f"dataset.path={path}, split '{which}', row {i}: the image column holds "
                            f"{type(img).__name__}, not an image")
        with img:
            if size:
                img = img.convert("L" if grey else "RGB") if img.mode not in ("I", "I;16", "F") else img
                img = img.resize((size, size), Image.BILINEAR)
            arrays.append(_pixels(img, grey))
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise DataError(f"dataset.path={path}, split '{which}': images of {len(shapes)} sizes ({shapes[0][:2]}, "
                        f"{shapes[-1][:2]}, ...): set dataset.image_size=N to resize them to N x N")
    stacked = np.stack(arrays)
    return np.ascontiguousarray(stacked[:, None] if grey else stacked.transpose(0, 3, 1, 2))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images on the 0..1 scale, summed
    a thousand images at a time."""
    sums, squares = np.zeros(images.shape[1]), np.zeros(images.shape[1])
    for start in range(0, len(images), 1000):
        part = images[start:start + 1000].astype(np.float64) / 255.0
        sums += part.sum(axis=(0, 2, 3))
        squares += (part ** 2).sum(axis=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 1e-12))
    return tuple(mean.tolist()), tuple(std.tolist())


@lru_cache(maxsize=4)
def _read(key: str) -> OwnData:
    from omegaconf import OmegaConf

    from fedlora.causal import prompt

    spec = json.loads(key)
    dcfg = OmegaConf.create(spec["dataset"])
    # what names the texts read (and their tokens' cache): the class names change the ids, not the texts
    texts_key = json.dumps(spec | {"dataset": spec["dataset"] | {"labels": None}}, sort_keys=True)
    path, causal = str(dcfg.path), spec["task"] == "causal_lm"
    ds = _load(dcfg)
    source = _source(path, texts_key)

    def columns_of(split, which: str) -> list[list]:
        """causal_lm: [prompts, responses]; else the text column(s) and the labels."""
        if causal:
            instruction, given, response = _texts(split, [dcfg.instruction, dcfg.input, dcfg.response], path, which,
                                                  optional=dcfg.input)
            return [[prompt(i, g, dcfg.template) for i, g in zip(instruction, given)], response]
        if dcfg.get("image"):  # undecoded: each image is decoded, resized and let go in turn
            import datasets

            _columns(split, [dcfg.image, dcfg.label], path, which)
            if isinstance(split.features[dcfg.image], datasets.Image):
                split = split.cast_column(dcfg.image, datasets.Image(decode=False))
            return [split[dcfg.image], split[dcfg.label]]
        return _texts(split, _text_columns(dcfg), path, which) + _columns(split, [dcfg.label], path, which)

    role = spec.get("role", "run")
    if role != "run":  # a node's own file, or the server's test split alone (data.on_nodes)
        if dcfg.get("image"):
            raise DataError(f"dataset.path={path}: images are read from dataset.path shared by the server and the "
                            "nodes; a node's own local-data, and data.on_nodes, hold text or instructions")
        which = dcfg.train_split if role == "node" else dcfg.test_split or dcfg.train_split
        split = _split(ds, which, path)
        cols = columns_of(split, which)
        if not cols[0]:
            raise DataError(f"dataset.path={path}: split '{which}' is empty")
        if causal:
            labels, names = np.zeros(len(cols[0]), np.int64), ("text",)
        elif dcfg.get("labels") is not None:
            names = tuple(str(n) for n in dcfg.labels)
            labels = _named_ids(cols[-1], split.features[str(dcfg.label)], names, path, str(dcfg.label), which)
        elif role == "test":  # the classes as the test split shows them
            if len(set(cols[-1])) < 2:
                raise DataError(f"dataset.path={path}: the server's test split '{which}' shows "
                                f"{len(set(cols[-1]))} class: name the run's classes with dataset.labels=[...]")
            labels, _, names = _label_ids(cols[-1], [], split.features[str(dcfg.label)], None, path, str(dcfg.label))
        else:
            raise DataError(f"dataset.path={path}: a node's own data needs the run's class names (dataset.labels), "
                            "which the server sends")
        texts = tuple(tuple(c) for c in (cols if causal else cols[:-1]))
        empty = tuple(() for _ in texts)
        if role == "node":
            return OwnData(texts, labels, empty, labels[:0], names, source)
        return OwnData(empty, labels[:0], texts, labels, names, source)
    train = _split(ds, dcfg.train_split, path)
    train_cols = columns_of(train, dcfg.train_split)
    by = spec.get("groups")
    if by is not None:  # partition=natural: the column's values, as ids in their sorted order
        [values] = _columns(train, [by], path, dcfg.train_split)
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise DataError(f"dataset.path={path}: partition.by={by} must name a column of ids (integers or "
                            "strings), one per client")
        order = sorted(set(values), key=lambda v: (isinstance(v, str), v))
        index = {v: i for i, v in enumerate(order)}
        train_cols.append([index[v] for v in values])
    if dcfg.test_split is not None:
        test = _split(ds, dcfg.test_split, path)
        test_cols = columns_of(test, dcfg.test_split)
    else:  # a hold-out of the training split
        test = train
        if len(train_cols[0]) < 2:
            raise DataError(f"dataset.path={path}: split '{dcfg.train_split}' has {len(train_cols[0])} examples, too "
                            "few to hold some out for testing")
        keep, held = _holdout(len(train_cols[0]), float(dcfg.test_fraction))
        train_cols, test_cols = [[c[i] for i in keep] for c in train_cols], [[c[i] for i in held] for c in train_cols]
    groups = None
    if by is not None:
        groups = np.asarray(train_cols.pop(), np.int64)
        if dcfg.test_split is None:  # the held-out rows are nobody's
            test_cols.pop()
    for name, cols in ((dcfg.train_split, train_cols), (dcfg.test_split or "held-out", test_cols)):
        if not cols[0]:
            raise DataError(f"dataset.path={path}: split '{name}' is empty")
    if causal:  # one class: partitions and histograms see every example alike
        return OwnData(tuple(tuple(c) for c in train_cols), np.zeros(len(train_cols[0]), np.int64),
                       tuple(tuple(c) for c in test_cols), np.zeros(len(test_cols[0]), np.int64), ("text",),
                       source, groups)
    label = str(dcfg.label)
    if dcfg.get("labels") is not None:  # the run's classes, in their order
        names = tuple(str(n) for n in dcfg.labels)
        y_train = _named_ids(train_cols[-1], train.features[label], names, path, label, dcfg.train_split)
        y_test = _named_ids(test_cols[-1], test.features[label], names, path, label, dcfg.test_split or "held-out")
        _two_classes(y_train, path, label)
    else:
        y_train, y_test, names = _label_ids(train_cols[-1], test_cols[-1], train.features[label],
                                            test.features[label], path, label)
    if dcfg.get("image"):  # grey when every training image is, as the test images are then read
        grey = True
        for item in train_cols[0]:
            img = _decode(item)
            grey = grey and hasattr(img, "mode") and is_grey(img)
            if hasattr(img, "close"):
                img.close()
            if not grey:
                break
        size = dcfg.get("image_size")
        train_images = _images(train_cols[0], path, dcfg.train_split, grey, size)
        return OwnData((), y_train, (), y_test, names, source, groups, train_images,
                       _images(test_cols[0], path, dcfg.test_split or "held-out", grey, size),
                       channel_stats(train_images))
    return OwnData(tuple(tuple(c) for c in train_cols[:-1]), y_train, tuple(tuple(c) for c in test_cols[:-1]),
                   y_test, names, source, groups)


def _source(path: str, key: str) -> str:
    """A name of what was read: the local files' paths, sizes and times, or the Hub id; with `key`."""
    local = Path(path)
    if local.exists():
        files = sorted(p for p in ([local] if local.is_file() else local.rglob("*")) if p.is_file())
        source = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    else:
        source = path
    return hashlib.sha256((source + key).encode()).hexdigest()[:20]


def read_own(cfg, role: str | None = None) -> OwnData:
    """The run's own data set, read once per process and config: its training and test splits
    (`run`); under data.on_nodes the server's test split alone (`test`: dataset.test_split, else
    dataset.train_split: all of a single file); or a node's own local-data (`node`: its train_split, all
    of a single file, to train on)."""
    from omegaconf import OmegaConf

    role = role or ("test" if cfg.data.get("on_nodes") else "run")
    by = cfg.partition.get("by") if cfg.partition.name == "natural" and role == "run" else None
    return _read(json.dumps({"dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "role": role,
                             "task": cfg.model.get("task", "classification"), "groups": by}, sort_keys=True))
