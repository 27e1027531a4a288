"""Config schema and validation.

Hydra composes the YAML groups in `conf/` on top of the `Config` dataclass below, which catches
unknown keys and wrong types. `validate` then checks the values that a type cannot express (names,
ranges, cross-field rules) so that a user mistake ends in one short message before any work starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


class FedloraError(Exception):
    """A user-facing error: the message is shown as it is, without a traceback."""


class ConfigError(FedloraError):
    pass


class RunInterrupted(FedloraError):
    """The user stopped a run; its records hold the rounds completed so far."""


@dataclass
class DatasetConfig:
    name: str = "fmnist"
    num_classes: int = 10
    default_model: str = "fmnist_cnn"


@dataclass
class ModelConfig:
    # "auto" picks the FedMUD paper's model for the dataset (DatasetConfig.default_model).
    name: str = "auto"


@dataclass
class PartitionConfig:
    name: str = "dirichlet"
    alpha: float = 0.3
    min_partition_size: int = 10
    classes_per_client: int = 3


@dataclass
class MethodConfig:
    name: str = "fedavg"


@dataclass
class LocalConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.03
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class DataConfig:
    # Where the data sets lie; FEDLORA_DATA is used when this is null.
    root: Optional[str] = None
    # Where decoded arrays are cached; FEDLORA_CACHE or ~/.cache/fedlora when null.
    cache_dir: Optional[str] = None
    # Fetch through torchvision when the files are missing (needs internet).
    download: bool = False
    # Seeded random subsets (for quick runs and tests); null keeps the full split.
    train_samples: Optional[int] = None
    test_samples: Optional[int] = None


@dataclass
class ClientResources:
    num_cpus: float = 1.0
    # "auto": a share of a GPU when one is present, none otherwise.
    num_gpus: Any = "auto"


@dataclass
class SimulationConfig:
    backend: str = "ray"
    client_resources: ClientResources = field(default_factory=ClientResources)
    # Address of a running Ray cluster ("auto" or "host:port"); null starts a local one.
    ray_address: Optional[str] = None
    # CPUs given to a local Ray instance; null lets Ray use all of them.
    ray_num_cpus: Optional[int] = None
    # Seconds the server waits for the replies of one round.
    round_timeout: float = 3600.0


@dataclass
class EvalConfig:
    batch_size: int = 1000


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    num_clients: int = 20
    clients_per_round: int = 5
    num_rounds: int = 5
    # Show Flower's own INFO logs as well as fedlora's round lines.
    verbose: bool = False


DATASETS = ("fmnist", "svhn", "cifar10", "cifar100")
PARTITIONS = ("iid", "dirichlet", "label_count")


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="fedlora_schema", node=Config)


def _choices(names) -> str:
    return ", ".join(sorted(names))


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the valid choices for the first mistake found."""
    from fedlora.models import DATASET_SHAPES, MODELS
    from strategies import STRATEGIES

    if cfg.dataset.name not in DATASETS:
        raise ConfigError(f"unknown dataset '{cfg.dataset.name}'; choose one of: {_choices(DATASETS)}")
    if cfg.model.name != "auto" and cfg.model.name not in MODELS:
        raise ConfigError(f"unknown model '{cfg.model.name}'; choose one of: auto, {_choices(MODELS)}")
    if cfg.model.name in MODELS and MODELS[cfg.model.name][1] != DATASET_SHAPES[cfg.dataset.name]:
        raise ConfigError(
            f"model '{cfg.model.name}' takes {MODELS[cfg.model.name][1]} inputs but dataset "
            f"'{cfg.dataset.name}' has {DATASET_SHAPES[cfg.dataset.name]}; leave model=auto for the "
            "dataset's own model"
        )
    if cfg.method.name not in STRATEGIES:
        raise ConfigError(f"unknown method '{cfg.method.name}'; choose one of: {_choices(STRATEGIES)}")
    p = cfg.partition
    if p.name not in PARTITIONS:
        raise ConfigError(f"unknown partition '{p.name}'; choose one of: {_choices(PARTITIONS)}")
    if p.name == "dirichlet" and not p.alpha > 0:
        raise ConfigError(f"partition.alpha must be > 0 (got {p.alpha})")
    if p.name == "dirichlet" and p.min_partition_size < 0:
        raise ConfigError(f"partition.min_partition_size must be >= 0 (got {p.min_partition_size})")
    if p.name == "label_count" and not 1 <= p.classes_per_client <= cfg.dataset.num_classes:
        raise ConfigError(
            f"partition.classes_per_client must be between 1 and {cfg.dataset.num_classes} "
            f"(got {p.classes_per_client})"
        )
    if cfg.num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1 (got {cfg.num_clients})")
    if not 1 <= cfg.clients_per_round <= cfg.num_clients:
        raise ConfigError(
            f"clients_per_round must be between 1 and num_clients={cfg.num_clients} "
            f"(got {cfg.clients_per_round})"
        )
    if cfg.num_rounds < 1:
        raise ConfigError(f"num_rounds must be >= 1 (got {cfg.num_rounds})")
    loc = cfg.local
    if loc.epochs < 1 or loc.batch_size < 1:
        raise ConfigError(f"local.epochs and local.batch_size must be >= 1 (got {loc.epochs}, {loc.batch_size})")
    if not loc.lr > 0 or loc.momentum < 0 or loc.weight_decay < 0:
        raise ConfigError("local.lr must be > 0 and local.momentum, local.weight_decay >= 0")
    for key in ("train_samples", "test_samples"):
        n = cfg.data[key]
        if n is not None and n < 1:
            raise ConfigError(f"data.{key} must be >= 1 or null (got {n})")
    if cfg.data.train_samples is not None and cfg.data.train_samples < cfg.num_clients:
        raise ConfigError(
            f"data.train_samples={cfg.data.train_samples} is fewer than num_clients={cfg.num_clients}"
        )
    res = cfg.simulation.client_resources
    if not res.num_cpus > 0:
        raise ConfigError(f"simulation.client_resources.num_cpus must be > 0 (got {res.num_cpus})")
    if res.num_gpus != "auto" and not (isinstance(res.num_gpus, (int, float)) and res.num_gpus >= 0):
        raise ConfigError(f"simulation.client_resources.num_gpus must be 'auto' or a number >= 0 (got {res.num_gpus})")
    if cfg.simulation.backend != "ray":
        raise ConfigError(f"unknown simulation.backend '{cfg.simulation.backend}'; choose one of: ray")
    # The data root is checked here too, so that a missing data set stops the run before Ray starts.
    from fedlora.data import check_available

    check_available(cfg.dataset.name, data_root(cfg), cfg.data.download)


def resolve(cfg: DictConfig) -> DictConfig:
    """Fill in the choices left to fedlora (model "auto", the data root), validate, and return
    a plain resolved copy."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if cfg.model.name == "auto":
        cfg.model.name = cfg.dataset.default_model
    if cfg.data.root is None and os.environ.get("FEDLORA_DATA"):
        cfg.data.root = os.environ["FEDLORA_DATA"]
    if cfg.data.root is not None:
        cfg.data.root = os.path.abspath(os.path.expanduser(cfg.data.root))
    validate(cfg)
    return cfg


def data_root(cfg: DictConfig) -> Optional[str]:
    return cfg.data.root or os.environ.get("FEDLORA_DATA")


def to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def from_json(text: str) -> DictConfig:
    return OmegaConf.create(json.loads(text))


def compose(overrides: list[str]) -> DictConfig:
    """The config that `fedlora-sim OVERRIDES...` would run, composed without launching anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
        raise ConfigError(f"{e}{cause}") from e
