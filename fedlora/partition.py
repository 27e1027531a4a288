"""Non-IID partitions of a labelled data set over clients, through flwr-datasets' partitioners.

Partitions depend only on (labels, partition config, number of clients, seed), so the server and
every client compute the same ones independently; nothing about them travels.
"""

from __future__ import annotations

import logging

import numpy as np

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


def partition_indices(labels: np.ndarray, num_clients: int, pcfg, seed: int,
                      groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Row indices of each client's partition, sorted, one array per client. `groups`: each row's
    value of the column that partition=natural gives one client per value of."""
    import datasets

    labels = np.asarray(labels)
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
        parts = [np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)) for i in range(num_clients)]
    except ValueError as e:
        # e.g. Dirichlet cannot reach min_partition_size with this many clients for this few rows
        raise ConfigError(f"cannot partition {len(labels)} samples over {num_clients} clients: {e}") from e
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
    return parts


def class_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per-client count of each class."""
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]
