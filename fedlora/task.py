"""What the server and every client build identically from a config: data, partitions, model, seeds,
and the conversion between a model and the arrays that travel."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedlora.data import DATASETS, Split, load_train_test, to_tensors
from fedlora.models import build_model
from fedlora.partition import partition_indices


def derive_seed(*parts: int | str) -> int:
    """A 31-bit seed derived from the run seed and labels such as the round and the client, the same
    in every process (unlike Python's hash of a string)."""
    words = [p if isinstance(p, int) else int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little")
             for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def _data_key(cfg: DictConfig) -> str:
    keep = {k: OmegaConf.to_container(cfg[k]) for k in ("dataset", "data", "partition")}
    keep.update(num_clients=cfg.num_clients, seed=cfg.seed)
    return json.dumps(keep, sort_keys=True)


@lru_cache(maxsize=4)
def _federated_data(key: str) -> tuple[Split, Split, list[np.ndarray]]:
    cfg = OmegaConf.create(json.loads(key))
    train, test = load_train_test(cfg)
    parts = partition_indices(train.labels, cfg.num_clients, cfg.partition, cfg.seed)
    return train, test, parts


def federated_data(cfg: DictConfig) -> tuple[Split, Split, list[np.ndarray]]:
    """(train split, test split, per-client row indices), computed once per process and config."""
    return _federated_data(_data_key(cfg))


@lru_cache(maxsize=256)  # all of a process's clients: together at most the training split, as floats
def _client_tensors(key: str, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    train, _, parts = _federated_data(key)
    return to_tensors(train, json.loads(key)["dataset"]["name"], parts[partition_id])


def client_tensors(cfg: DictConfig, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's normalised training tensors, kept in memory between rounds."""
    return _client_tensors(_data_key(cfg), partition_id)


def test_tensors(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    _, test, _ = federated_data(cfg)
    return to_tensors(test, cfg.dataset.name)


def initial_model(cfg: DictConfig) -> nn.Module:
    return build_model(cfg.model.name, DATASETS[cfg.dataset.name].num_classes, derive_seed(cfg.seed, "model-init"))


def travelling_keys(model: nn.Module) -> list[str]:
    """The state entries that travel: parameters and float buffers (BatchNorm statistics).
    BatchNorm's integer batch counter stays home: with a set momentum it is never read."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    state = model.state_dict()
    return ArrayRecord({k: state[k].detach().cpu() for k in travelling_keys(model)})


def arrays_to_model(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    state = {k: torch.from_numpy(np.array(a.numpy())) for k, a in arrays.items()}
    missing = set(travelling_keys(model)) - set(state)
    if missing:
        raise KeyError(f"arrays lack model entries: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)
    return model
