"""A run's data as the federation sees it: the training and test splits, each client's partition,
and the tensors a client trains on, computed once per process and config, identically everywhere."""

from __future__ import annotations

import copy
import json
from functools import lru_cache

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedlora.data import (Split, dataset_info, default_cache_dir, load_full, load_own, load_test, load_train_test,
                          to_tensors)
from fedlora.errors import DataError
from fedlora.partition import partition_indices
from fedlora.seeds import derive_seed


def _data_key(cfg: DictConfig) -> str:
    keep = {k: OmegaConf.to_container(cfg[k]) for k in ("dataset", "data", "partition")}
    keep.update(num_clients=cfg.num_clients, seed=cfg.seed,
                model={"hf": cfg.model.hf, "max_length": cfg.model.max_length,  # text: the tokenizer
                       "task": cfg.model.get("task", "classification")})
    return json.dumps(keep, sort_keys=True)


@lru_cache(maxsize=4)
def _federated_data(key: str) -> tuple[Split, Split, list[np.ndarray]]:
    cfg = OmegaConf.create(json.loads(key))
    train, test = load_train_test(cfg)
    parts = partition_indices(train.labels, cfg.num_clients, cfg.partition, cfg.seed, train.groups,
                              cache_dir=cfg.data.cache_dir or default_cache_dir())
    return train, test, parts


def federated_data(cfg: DictConfig) -> tuple[Split, Split, list[np.ndarray]]:
    """(train split, test split, per-client row indices), computed once per process and config."""
    return _federated_data(_data_key(cfg))


# A deployed node's one partition is kept between rounds. A simulation's actor serves other clients each
# round: their tensors (floats, 4x the uint8 images) are made again from the split, which the process
# maps from the disk cache (3-10 ms), rather than kept, which made every actor hold up to the
# whole training split as floats (0.19 GB of Fashion-MNIST, 0.6 GB of CIFAR-10): benchmarks/README.md.
@lru_cache(maxsize=2)
def _client_tensors(key: str, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    train, _, parts = _federated_data(key)
    return to_tensors(train, dataset_info(OmegaConf.create(json.loads(key))), parts[partition_id])


def client_tensors(cfg: DictConfig, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's normalised training tensors (those of the process's last two clients kept)."""
    return _client_tensors(_data_key(cfg), partition_id)


@lru_cache(maxsize=2)
def _local_tensors(key: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = OmegaConf.create(json.loads(key))
    name = cfg.dataset.name
    where = cfg.dataset.path if name == "hf" else cfg.data.root
    try:
        info = dataset_info(cfg)  # under dataset=hf the run's classes, which the server sent: nothing is read
        if name == "hf":  # the run's column settings and classes, over the node's own file or folder
            x, y = to_tensors(load_own(cfg, "train", role="node"), info)
        else:
            x, y = to_tensors(load_full(cfg, "train"), name)
    except DataError as e:
        raise DataError(f"local-data {where}: {e}") from e
    num_classes, want = info.num_classes, info.shape
    if len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(f"local-data {where}: {len(y)} examples, labels must be 0..{num_classes - 1}")
    if want is not None and tuple(x.shape[1:]) != tuple(want):
        raise DataError(f"local-data {where}: inputs of shape {tuple(x.shape[1:])}, '{name}' has {tuple(want)}")
    return x, y


def local_tensors(cfg: DictConfig, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A deployed node's own training data, all of it (not a partition of a shared data set): the
    training split of a folder laid out like a data root (Fashion-MNIST's IDX files, CIFAR's or SVHN's
    train.npz, AG News's dev.tsv), or under dataset=hf a file or folder in any of its formats, read with
    the run's columns and classes. Its labels and input shape are checked against the run's."""
    cfg = copy.deepcopy(cfg)
    if cfg.dataset.name == "hf":
        cfg.dataset.path = str(where)
    else:
        cfg.data.root, cfg.data.download = str(where), False
    return _local_tensors(_data_key(cfg))


def test_tensors(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The server's test tensors: of the shared data set, or under data.on_nodes of its test split
    alone (None when it has none)."""
    if cfg.data.get("on_nodes"):
        test = load_test(cfg)
        return None if test is None else to_tensors(test, dataset_info(cfg))
    _, test, _ = federated_data(cfg)
    return to_tensors(test, dataset_info(cfg))


def holdout(n: int, fraction: float, seed: int, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's rows split into (train, held out) under eval.clients: a seeded `fraction` of them
    (at least one, and at least one left to train on when there are two) held out."""
    held = min(max(1, round(fraction * n)), n - 1) if n > 1 else 0
    order = np.random.default_rng(derive_seed(seed, "client-holdout", partition_id)).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def split_for_clients(cfg: DictConfig, partition_id: int, x: torch.Tensor,
                      y: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((x, y) to train on, (x, y) held out) of a client: all of it, and nothing, unless eval.clients."""
    if not cfg.eval.clients:
        return (x, y), (x[:0], y[:0])
    train, held = (torch.from_numpy(i) for i in holdout(len(y), cfg.eval.client_fraction, cfg.seed, partition_id))
    return (x[train], y[train]), (x[held], y[held])


def train_count(cfg: DictConfig, partition_id: int, n: int) -> int:
    """How many of a client's n examples it trains on."""
    return len(holdout(n, cfg.eval.client_fraction, cfg.seed, partition_id)[0]) if cfg.eval.clients else n
