"""Non-IID partitions of a labelled data set over clients, through flwr-datasets' partitioners.

Partitions depend only on (labels, partition config, number of clients, seed), so the server and
every client compute the same ones independently; nothing about them travels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from fedlora.cache import save_atomic
from fedlora.errors import ConfigError

log = logging.getLogger("fedlora")


def _iid(num_clients: int, pcfg, seed: int):
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_clients)


def _dirichlet(num_clients: int, pcfg, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=float(pcfg.alpha),
                                min_partition_size=int(pcfg.min_partition_size), self_balancing=False,
                                shuffle=True, seed=seed)


def _label_count(num_clients: int, pcfg, seed: int):
    from flwr_datasets.partitioner import PathologicalPartitioner

    # Client i's first class is i mod the class count, so every class is used when there are at least
    # as many clients as classes; its other k-1 classes are drawn at random.
    return PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                   num_classes_per_partition=int(pcfg.classes_per_client),
                                   class_assignment_mode="first-deterministic", shuffle=True, seed=seed)


def _shard(num_clients: int, pcfg, seed: int):
    from flwr_datasets.partitioner import ShardPartitioner

    # McMahan et al.'s pathological split: the rows sorted by label, cut into equal shards, each client
    # dealt `shards_per_client` of them at random
    return ShardPartitioner(num_partitions=num_clients, partition_by="label",
                            num_shards_per_partition=int(pcfg.shards_per_client), shuffle=True, seed=seed)


def _natural(num_clients: int, pcfg, seed: int):
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by="group")  # one client per distinct value of the column


# partition name (conf/partition/<name>.yaml) -> builder of its flwr-datasets partitioner
PARTITIONERS = {"iid": _iid, "dirichlet": _dirichlet, "label_count": _label_count, "shard": _shard,
                "natural": _natural}


def _cache_file(cache_dir, labels: np.ndarray, num_clients: int, pcfg, seed: int,
                groups: np.ndarray | None) -> Path:
    """Where the partitions of exactly these rows and this config are kept: named after a hash of the
    labels (and groups), the partition config, the client count, the seed, this module's code and
    the versions of what computes them (flwr-datasets, datasets, numpy)."""
    from importlib.metadata import version

    from omegaconf import OmegaConf

    digest = hashlib.sha256(Path(__file__).read_bytes())
    for part in (labels, groups):
        if part is not None:
            part = np.ascontiguousarray(part)
            digest.update(f"{part.dtype}{part.shape}".encode())
            digest.update(part.tobytes())
    config = OmegaConf.to_container(pcfg) if OmegaConf.is_config(pcfg) else dict(pcfg)
    versions = [version(p) for p in ("flwr-datasets", "datasets", "numpy")]
    digest.update(json.dumps([config, num_clients, seed, versions], sort_keys=True,
                             default=str).encode())
    return Path(cache_dir) / f"partitions-{digest.hexdigest()[:24]}.npz"


def partition_indices(labels: np.ndarray, num_clients: int, pcfg, seed: int,
                      groups: np.ndarray | None = None, cache_dir=None) -> list[np.ndarray]:
    """Row indices of each client's partition, sorted, one array per client. `groups`: each row's
    value of the column that partition=natural gives one client per value of. With `cache_dir`, the
    partitions are kept there and read back by every process of the run (the server computes them
    before the clients start): a client process then needs neither the partitioners nor what they
    import (datasets, pandas, SciPy: 0.2 GB a process), nor their time (6 s for 10,000 clients)."""
    labels = np.asarray(labels)
    cached = None if cache_dir is None else _cache_file(cache_dir, labels, num_clients, pcfg, seed, groups)
    parts = None
    if cached is not None and cached.is_file():
        try:
            with np.load(cached) as z:
                parts = np.split(z["rows"], z["ends"][:-1])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # unreadable: computed (and written) again
            cached.unlink(missing_ok=True)
    if parts is None:
        parts = _partition(labels, num_clients, pcfg, seed, groups)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"partition '{pcfg.name}' left {len(empty)} of {num_clients} clients without data "
                          f"({len(labels)} samples); use fewer clients or more data")
    used = sum(len(p) for p in parts)
    if used < len(labels):
        held = np.zeros(len(labels), bool)
        held[np.concatenate(parts)] = True
        log.warning("partition '%s': %d of %d samples (classes %s) are held by no client", pcfg.name,
                    len(labels) - used, len(labels), sorted(set(labels[~held].tolist())))
    if cached is not None and not cached.is_file():
        try:
            save_atomic(cached, rows=np.concatenate(parts), ends=np.cumsum([len(p) for p in parts]))
        except OSError:
            pass  # a read-only cache only costs computing them again
    return parts


def _partition(labels: np.ndarray, num_clients: int, pcfg, seed: int,
               groups: np.ndarray | None) -> list[np.ndarray]:
    """The partitions, from flwr-datasets' partitioner of the config."""
    import datasets

    # IidPartitioner cuts contiguous shards: the rows are shuffled first, with the run's seed.
    order = np.random.default_rng(seed).permutation(len(labels)) if pcfg.name == "iid" else np.arange(len(labels))
    if pcfg.name == "shard" and len(labels) < num_clients * int(pcfg.shards_per_client):
        raise ConfigError(f"partition=shard: {len(labels)} samples cannot make {num_clients} x "
                          f"{pcfg.shards_per_client} shards of one sample or more; use partition.shards_per_client="
                          f"{max(1, len(labels) // num_clients)} or less")
    partitioner = PARTITIONERS[pcfg.name](num_clients, pcfg, seed)
    columns = {"row": order, "label": labels[order].astype(np.int64)}
    if pcfg.name == "natural":
        if groups is None:
            raise ConfigError(f"partition=natural gives one client per value of a column: dataset=hf with "
                              f"partition.by=COLUMN (its data set has its own columns)")
        distinct = len(np.unique(groups))
        if distinct != num_clients:
            raise ConfigError(f"partition=natural by '{pcfg.by}': the training rows (after the test hold-out and "
                              f"data.train_samples) hold {distinct} distinct values, {distinct} clients; set "
                              f"num_clients={distinct} (now {num_clients})")
        columns["group"] = np.asarray(groups)[order]
    partitioner.dataset = datasets.Dataset.from_dict(columns)
    try:
        # read as one numpy array: as a Python list, each partition's rows cost 5-10x more
        parts = [np.sort(partitioner.load_partition(i).with_format("numpy")[:]["row"].astype(np.int64))
                 for i in range(num_clients)]
    except ValueError as e:
        # e.g. Dirichlet cannot reach min_partition_size with this many clients for this few rows
        raise ConfigError(f"cannot partition {len(labels)} samples over {num_clients} clients: {e}") from e
    return parts


def class_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per-client count of each class."""
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]
