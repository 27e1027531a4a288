"""Non-IID partitions of a labelled data set over clients, through flwr-datasets' partitioners.

Partitions depend only on (labels, partition config, number of clients, seed), so the server and
every client compute the same ones independently; nothing about them travels.
"""

from __future__ import annotations

import numpy as np

from fedlora.config import ConfigError


def partition_indices(labels: np.ndarray, num_clients: int, pcfg, seed: int) -> list[np.ndarray]:
    """Row indices of each client's partition, sorted, one array per client."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    labels = np.asarray(labels)
    order = np.arange(len(labels))
    if pcfg.name == "iid":
        # IidPartitioner cuts contiguous shards: shuffle the rows first, with the run's seed.
        order = np.random.default_rng(seed).permutation(len(labels))
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif pcfg.name == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(pcfg.alpha),
            min_partition_size=int(pcfg.min_partition_size),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    elif pcfg.name == "label_count":
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=int(pcfg.classes_per_client),
            # client i's first class is i mod the class count, so every class is used when there
            # are at least as many clients as classes; the other k-1 are drawn at random
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    else:
        raise ConfigError(f"unknown partition '{pcfg.name}'")
    table = datasets.Dataset.from_dict({"row": order.astype(np.int64), "label": labels[order].astype(np.int64)})
    partitioner.dataset = table
    try:
        parts = [np.sort(np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)) for i in range(num_clients)]
    except ValueError as e:
        # e.g. Dirichlet cannot reach min_partition_size with this many clients for this few rows
        raise ConfigError(f"cannot partition {len(labels)} samples over {num_clients} clients: {e}") from e
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(
            f"partition '{pcfg.name}' left {len(empty)} of {num_clients} clients without data "
            f"({len(labels)} samples); use fewer clients or more data"
        )
    return parts


def class_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per-client count of each class."""
    return [np.bincount(labels[p], minlength=num_classes).tolist() for p in parts]
