"""What the server and every client build identically from a config: data, partitions, model, seeds,
and the conversion between a model and the arrays that travel."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedlora.adapters import adapters, freeze_a, inject_adapters, make_adapter, reset_adapters
from fedlora.data import DATASETS, Split, load_full, load_train_test, to_tensors
from fedlora.errors import DataError
from fedlora.hf import image_classifier, load_classifier
from fedlora.text import TextClassifier
from fedlora.decompose import KINDS, KronShape, Plan, decompose, fold_updates, frozen_keys, plan_sizes, reset_factors
from fedlora.models import build_model
from fedlora.partition import partition_indices
from fedlora.seeds import derive_seed


# The ClientApp's train action that applies a broadcast update (method.downlink=broadcast_update).
APPLY_UPDATE = "apply_update"


def _data_key(cfg: DictConfig) -> str:
    keep = {k: OmegaConf.to_container(cfg[k]) for k in ("dataset", "data", "partition")}
    keep.update(num_clients=cfg.num_clients, seed=cfg.seed,
                model={"hf": cfg.model.hf, "max_length": cfg.model.max_length})  # text: the tokenizer
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


@lru_cache(maxsize=2)
def _local_tensors(key: str) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = OmegaConf.create(json.loads(key))
    name = cfg.dataset.name
    try:
        x, y = to_tensors(load_full(cfg, "train"), name)
    except DataError as e:
        raise DataError(f"local-data {cfg.data.root}: {e}") from e
    num_classes, want = DATASETS[name].num_classes, DATASETS[name].shape
    if len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise DataError(f"local-data {cfg.data.root}: {len(y)} examples, labels must be 0..{num_classes - 1}")
    if want is not None and tuple(x.shape[1:]) != tuple(want):
        raise DataError(f"local-data {cfg.data.root}: inputs of shape {tuple(x.shape[1:])}, '{name}' has {tuple(want)}")
    return x, y


def local_tensors(cfg: DictConfig, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A deployed node's own training data: the whole training split under `root` (a folder laid out
    like a data root: Fashion-MNIST's IDX files, CIFAR's or SVHN's train.npz, AG News's dev.tsv), not a
    partition of a shared one. Its labels and input shape are checked against the data set's."""
    cfg = copy.deepcopy(cfg)
    cfg.data.root, cfg.data.download = str(root), False
    return _local_tensors(_data_key(cfg))


def test_tensors(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    _, test, _ = federated_data(cfg)
    return to_tensors(test, cfg.dataset.name)


@lru_cache(maxsize=2)
def _pretrained(hf: str, num_labels: int, seed: int, num_layers: int | None, image: bool) -> nn.Module:
    return load_classifier(hf, num_labels, seed, num_layers, image)


def dense_model(cfg: DictConfig) -> nn.Module:
    """The model before any factorization or adapter: drawn from the seed, or pretrained (read once
    per process) with a seeded classifier head."""
    info, seed = DATASETS[cfg.dataset.name], derive_seed(cfg.seed, "model-init")
    num_classes = info.num_classes
    if cfg.adapter is not None:
        hf = copy.deepcopy(_pretrained(cfg.model.hf, num_classes, seed, cfg.model.num_layers, not info.text))
        return TextClassifier(hf) if info.text else image_classifier(hf, cfg.model.hf, info.mean, info.std)
    return build_model(cfg.model.name, num_classes, seed)


@lru_cache(maxsize=8)
def _plan(key: str) -> Plan:
    cfg = OmegaConf.create(json.loads(key))
    m = cfg.method
    return plan_sizes(dense_model(cfg), m.factorization, m.compression_ratio, m.dense_first_last)


def method_plan(cfg: DictConfig) -> Plan | None:
    """The per-layer ranks or blocks of the method's factorization (None for a dense method)."""
    if cfg.method.factorization is None:
        return None
    keep = {k: OmegaConf.to_container(cfg[k]) if cfg[k] is not None else None for k in ("model", "dataset", "method", "adapter")}
    return _plan(json.dumps(keep | {"seed": cfg.seed}, sort_keys=True))


def factor_seed(cfg: DictConfig, server_round: int) -> int:
    """The seed of the factors drawn at the start of `server_round` (0: the initial model)."""
    return derive_seed(cfg.seed, "factors", server_round)


def initial_model(cfg: DictConfig) -> nn.Module:
    """The model as the method trains it: the dense model, with its adapted layers factorized as
    planned and the factors drawn from the run seed (FedMUD redraws them each round)."""
    model = dense_model(cfg)
    plan = method_plan(cfg)
    if plan is not None:
        decompose(model, plan, cfg.method.init_magnitude or 0.0)
        reset_factors(model, factor_seed(cfg, 0))
    if cfg.adapter is not None:
        inject_adapters(model.model, cfg.adapter.targets, make_adapter(cfg.adapter), trainable=cfg.adapter.train)
        reset_adapters(model, factor_seed(cfg, 0))
        if cfg.method.freeze_a:
            for _, adapter in adapters(model):
                freeze_a(adapter)
    return model


def redraws(cfg: DictConfig, server_round: int) -> bool:
    """Whether FedMUD folds ΔW into W and redraws the factors at the start of this round."""
    f = cfg.method.factorization
    return f is not None and KINDS[f].mode == "update" and (server_round - 1) % cfg.method.interval == 0


def start_round(model: nn.Module, cfg: DictConfig, server_round: int) -> int | None:
    """What server and every replica do as a round starts: under FedMUD, every `interval` rounds, fold
    the update into the weights and redraw the factors from the round's seed. Returns that seed."""
    if not redraws(cfg, server_round):
        return None
    fold_updates(model)
    seed = factor_seed(cfg, server_round)
    reset_factors(model, seed)
    return seed


def travelling_keys(model: nn.Module) -> list[str]:
    """The state entries that travel down: parameters and float buffers (BatchNorm statistics, the
    frozen base weights of FedMUD). Frozen factors are not state: every process regenerates them.
    BatchNorm's integer batch counter stays home: with a set momentum it is never read.
    With adapters, only what trains travels: every process holds the pretrained weights, and frozen
    adapter factors come from the seed."""
    state = model.state_dict()
    if adapters(model):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return [k for k in state if k in trainable]
    return [k for k, v in state.items() if v.is_floating_point()]


def uplink_keys(model: nn.Module) -> list[str]:
    """What a client sends back: what it trained (parameters) and its BatchNorm statistics, never the
    frozen base weights."""
    frozen = frozen_keys(model)
    return [k for k in travelling_keys(model) if k not in frozen]


def model_to_arrays(model: nn.Module, keys: Iterable[str] | None = None) -> ArrayRecord:
    """The travelling entries (or `keys`) of the model's state, in state order."""
    state = model.state_dict()
    return ArrayRecord({k: state[k].detach().cpu() for k in (travelling_keys(model) if keys is None else keys)})


def compression(cfg: DictConfig) -> dict | None:
    """The method's uplink per client against the dense model's, measured on the serialized arrays
    as they travel; with the planned sizes, and why a target is out of reach."""
    plan = method_plan(cfg)
    if plan is None:
        return None
    model = initial_model(cfg)
    up = sum(len(a.data) for a in model_to_arrays(model, uplink_keys(model)).values())
    dense = sum(len(a.data) for a in model_to_arrays(dense_model(cfg)).values())
    achieved = up / dense
    return {"factorization": plan.kind, "target": plan.target, "achieved": achieved,
            "within_5_percent": abs(achieved - plan.target) <= 0.05 * plan.target, "note": plan.note,
            "uplink_bytes_per_client": up, "dense_bytes_per_client": dense,
            "layers": {name: str(size) if isinstance(size, KronShape) else f"rank {size}"
                       for name, size in plan.sizes.items()}}


def arrays_to_model(model: nn.Module, arrays: ArrayRecord, required: Iterable[str] | None = None) -> nn.Module:
    """Load arrays into the model; `required` (default: every travelling entry) must all be there."""
    state = {k: torch.from_numpy(np.array(a.numpy())) for k, a in arrays.items()}
    missing = set(travelling_keys(model) if required is None else required) - set(state)
    if missing:
        raise KeyError(f"arrays lack model entries: {sorted(missing)[:5]}")
    unknown = set(state) - set(model.state_dict())
    if unknown:
        raise KeyError(f"arrays hold entries the model does not have: {sorted(unknown)[:5]}")
    model.load_state_dict(state, strict=False)
    return model
