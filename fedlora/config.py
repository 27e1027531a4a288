"""Config schema and validation.

The dataclasses below are the schema: the keys and types of a run's config, with what each means.
The values live in the YAML files of `conf/` (`conf/config.yaml` and one file per group option),
which Hydra composes on top of this schema, so an unknown key or a wrong type fails at composition.
`validate` then checks what a type cannot express (names, ranges, cross-field rules), so that a user
mistake ends in one short message before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from fedlora.errors import ConfigError


@dataclass
class DatasetConfig:
    name: str = MISSING  # fmnist, svhn, cifar10, cifar100 (classes and shapes: fedlora.data.DATASETS)


@dataclass
class ModelConfig:
    # a name in fedlora.models.MODELS or fedlora.hf.PRETRAINED, or "auto": the dataset's own model
    # ("hf" after resolving, when model.hf alone names a pretrained model)
    name: str = MISSING
    hf: Optional[str] = None  # pretrained models: a Hugging Face Hub id or a local path (null: the preset's)
    num_layers: Optional[int] = None  # pretrained models: keep only the first layers (quick tests)
    max_length: Optional[int] = None  # pretrained text models: tokens per text (null: the preset's)


@dataclass
class AdapterConfig:  # low-rank adapters on a pretrained model (fedlora.adapters)
    name: str = MISSING  # lora, lora_nonzero, bora
    r: int = MISSING
    alpha: float = MISSING  # the update is scaled by alpha / r
    dropout: float = MISSING  # on the adapter's input
    targets: list[str] = MISSING  # Linear layers to adapt: names or name suffixes (PEFT's target_modules)
    train: list[str] = MISSING  # modules trained as they are, besides the adapters (the new classifier head)
    init: Optional[str] = None  # LoRA: zero (B = 0) or nonzero (A and B from U(-sqrt(beta/n), sqrt(beta/n)))
    beta_a: Optional[float] = None  # nonzero init: beta of A
    beta_b: Optional[float] = None  # nonzero init: beta of B
    subtract_initial: Optional[bool] = None  # nonzero init: take the initial product out of the frozen weight
    blocks: Optional[int] = None  # BoRA: b blocks of A's columns and B's rows


@dataclass
class PartitionConfig:
    name: str = MISSING  # iid, dirichlet, label_count
    alpha: Optional[float] = None  # dirichlet: concentration; smaller is more skewed
    min_partition_size: Optional[int] = None  # dirichlet: resample until every client has this many
    classes_per_client: Optional[int] = None  # label_count: exactly this many classes per client


@dataclass
class MethodConfig:
    name: str = MISSING  # the preset's name (conf/method/NAME.yaml)
    strategy: str = MISSING  # a key of strategies.STRATEGIES
    # How adapted layers (Conv2d, Linear) train, a key of fedlora.decompose.KINDS; null: dense (FedAvg).
    # lowrank, aad_lowrank, kronecker, aad_kronecker: the round's update W + ΔW (FedMUD);
    # lowrank_weight (FedLMT), hadamard (FedPara): the weight itself.
    factorization: Optional[str] = None
    compression_ratio: Optional[float] = None  # target uplink bytes relative to the dense model's (1/32 = 0.03125)
    interval: Optional[int] = None  # FedMUD: fold ΔW into W and redraw the factors every `interval` rounds
    init_magnitude: Optional[float] = None  # FedMUD: the random factors are drawn from U(-a, a)
    dense_first_last: bool = True  # keep the first and the last adapted layer dense
    # FedMUD: "global" (sampled clients receive the global weights) or "broadcast_update" (every client
    # receives each round's aggregated update and keeps its own replica); null for the other methods
    downlink: Optional[str] = None
    freeze_a: bool = False  # FFA-LoRA: A stays at its (seeded) initial value; only B (and the head) train and travel
    fair_lambda: Optional[float] = None  # LoRA-FAIR: weight of ||ΔB||² in the server's refinement of B
    fair_steps: Optional[int] = None  # LoRA-FAIR: optimiser steps of that refinement
    fair_lr: Optional[float] = None  # LoRA-FAIR: its learning rate (Adam)


@dataclass
class LocalConfig:  # clients' local training
    optimizer: str = MISSING  # sgd or adamw
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING


@dataclass
class DataConfig:
    root: Optional[str] = None  # where the data sets lie; FEDLORA_DATA when null
    cache_dir: Optional[str] = None  # decoded arrays; FEDLORA_CACHE or ~/.cache/fedlora when null
    download: bool = False  # fetch missing data sets through torchvision (needs internet)
    train_samples: Optional[int] = None  # a seeded random subset of the training split; null: all
    test_samples: Optional[int] = None  # likewise for the test split


@dataclass
class ClientResources:
    num_cpus: float = MISSING  # Ray CPUs per virtual client (Ray sets its torch threads to match)
    num_gpus: Any = MISSING  # "auto": a fifth of a GPU when one is present, none otherwise; or a number


@dataclass
class SimulationConfig:
    backend: str = MISSING  # ray
    client_resources: ClientResources = field(default_factory=ClientResources)
    ray_address: Optional[str] = None  # a running Ray cluster ("host:port" or "auto"); null: a new local one
    ray_num_cpus: Optional[int] = None  # CPUs of a new local Ray instance; null: all
    round_timeout: float = MISSING  # seconds the server waits for a round's replies


@dataclass
class EvalConfig:
    batch_size: int = MISSING  # server-side evaluation on the test split


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    adapter: Optional[AdapterConfig] = None  # pretrained models only
    local: LocalConfig = field(default_factory=LocalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = MISSING  # fixes partitions, initial model, client sampling and batch order
    num_clients: int = MISSING
    clients_per_round: int = MISSING
    num_rounds: int = MISSING
    verbose: bool = False  # Flower's and Ray's own logs as well as fedlora's round lines
    tensorboard: Any = MISSING  # TensorBoard event files beside metrics.jsonl: "auto" (when installed), true, false


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="fedlora_schema", node=Config)


def _choices(names) -> str:
    return ", ".join(sorted(names))


def _at_least(cfg: DictConfig, key: str, low: float, strict: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None or (value <= low if strict else value < low):
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {low} (got {value})")


def _validate_pretrained(cfg: DictConfig, info) -> None:
    if cfg.model.name == "minilm" and not info.text:
        raise ConfigError(f"model 'minilm' is a pretrained text model; dataset '{cfg.dataset.name}' holds images "
                          "(model=vit, or model.hf=ID_OR_PATH of an image classifier)")
    if cfg.model.name == "vit" and info.text:
        raise ConfigError(f"model 'vit' is a pretrained image model; dataset '{cfg.dataset.name}' is text "
                          "(model=minilm, or model.hf=ID_OR_PATH of a sequence classifier)")
    a = cfg.adapter
    if a is None:
        raise ConfigError("a pretrained model is fine-tuned through adapters: add adapter=lora (or lora_nonzero, bora)")
    if a.name not in ("lora", "lora_nonzero", "bora"):
        raise ConfigError(f"unknown adapter '{a.name}'; choose one of: bora, lora, lora_nonzero")
    _at_least(cfg, "adapter.r", 1)
    _at_least(cfg, "adapter.alpha", 0, strict=True)
    if not 0 <= a.dropout < 1:
        raise ConfigError(f"adapter.dropout must be in [0, 1) (got {a.dropout})")
    if not a.targets:
        raise ConfigError("adapter.targets must name the Linear layers to adapt, e.g. [query, value]")
    if a.name == "bora":
        _at_least(cfg, "adapter.blocks", 1)
    elif a.init not in ("zero", "nonzero"):
        raise ConfigError(f"adapter.init must be zero or nonzero (got {a.init})")
    if cfg.method.factorization is not None:
        raise ConfigError(f"method={cfg.method.name} factorizes a model trained from scratch; for a pretrained "
                          "model choose method=fedit, ffa_lora or lora_fair")
    if info.text:
        _at_least(cfg, "model.max_length", 1)


def _validate_method(method: DictConfig, strategies) -> None:
    from fedlora.decompose import KINDS

    if method.strategy not in strategies:
        raise ConfigError(f"unknown method.strategy '{method.strategy}'; choose one of: {_choices(strategies)}")
    if (method.strategy == "factorized") != (method.factorization is not None):
        raise ConfigError(f"method.strategy={method.strategy} does not go with method.factorization="
                          f"{method.factorization}: the factorized strategy trains a factorization, fedavg a dense "
                          "model; pick a preset (method=fedavg, fedmud, fedmud_bkd_aad, fedlmt, ...)")
    if method.strategy == "lora_fair" and not (method.fair_lambda is not None and method.fair_lambda >= 0
                                               and (method.fair_steps or 0) >= 1 and (method.fair_lr or 0) > 0):
        raise ConfigError("lora_fair needs method.fair_lambda >= 0, method.fair_steps >= 1 and method.fair_lr > 0")
    if method.factorization is None:
        if method.downlink == "broadcast_update":
            raise ConfigError("method.downlink=broadcast_update needs a FedMUD method (fedmud, fedmud_bkd, ...)")
        return
    if method.factorization not in KINDS:
        raise ConfigError(f"unknown method.factorization '{method.factorization}'; choose one of: {_choices(KINDS)}")
    ratio = method.compression_ratio
    if ratio is None or not 0 < ratio < 1:
        raise ConfigError(f"method.compression_ratio must be in (0, 1), e.g. 0.03125 for 1/32 (got {ratio})")
    if method.downlink not in (None, "global", "broadcast_update"):
        raise ConfigError(f"method.downlink must be global or broadcast_update (got {method.downlink})")
    if method.downlink == "broadcast_update" and KINDS[method.factorization].mode != "update":
        raise ConfigError("method.downlink=broadcast_update needs a FedMUD factorization of the update "
                          f"(lowrank, aad_lowrank, kronecker, aad_kronecker), not {method.factorization}")
    if KINDS[method.factorization].mode == "update":
        if method.interval is None or method.interval < 1:
            raise ConfigError(f"method.interval must be >= 1 (got {method.interval})")
        if method.init_magnitude is None or not method.init_magnitude > 0:
            raise ConfigError(f"method.init_magnitude must be > 0 (got {method.init_magnitude})")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the valid choices for the first mistake found."""
    from fedlora.data import DATASETS, check_available
    from fedlora.hf import PRETRAINED
    from fedlora.models import MODELS
    from fedlora.partition import PARTITIONERS
    from strategies import STRATEGIES

    if cfg.dataset.name not in DATASETS:
        raise ConfigError(f"unknown dataset '{cfg.dataset.name}'; choose one of: {_choices(DATASETS)}")
    info = DATASETS[cfg.dataset.name]
    if cfg.model.name in PRETRAINED or cfg.model.hf is not None:
        _validate_pretrained(cfg, info)
    else:
        if info.text:
            raise ConfigError(f"dataset '{cfg.dataset.name}' is text: it needs a pretrained model "
                              "(model=minilm, or model.hf=ID_OR_PATH) and an adapter (adapter=lora)")
        if cfg.model.name not in MODELS:
            raise ConfigError(f"unknown model '{cfg.model.name}'; choose one of: auto, "
                              f"{_choices(list(MODELS) + list(PRETRAINED))}")
        if MODELS[cfg.model.name].input_shape != info.shape:
            raise ConfigError(
                f"model '{cfg.model.name}' takes {MODELS[cfg.model.name].input_shape} inputs but dataset "
                f"'{cfg.dataset.name}' has {info.shape}; leave model=auto for the dataset's own model"
            )
        if cfg.adapter is not None:
            raise ConfigError(f"adapter={cfg.adapter.name} fine-tunes a pretrained model; model "
                              f"'{cfg.model.name}' trains from scratch (use method=fedmud... for low-rank updates)")
    _validate_method(cfg.method, STRATEGIES)
    if (cfg.method.freeze_a or cfg.method.strategy == "lora_fair") and cfg.adapter is None:
        raise ConfigError(f"method={cfg.method.name} aggregates adapters: it needs a pretrained model and an "
                          "adapter (dataset=agnews adapter=lora)")
    if cfg.local.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"local.optimizer must be sgd or adamw (got {cfg.local.optimizer})")
    p = cfg.partition
    if p.name not in PARTITIONERS:
        raise ConfigError(f"unknown partition '{p.name}'; choose one of: {_choices(PARTITIONERS)}")
    if p.name == "dirichlet":
        _at_least(cfg, "partition.alpha", 0, strict=True)
        _at_least(cfg, "partition.min_partition_size", 0)
    if p.name == "label_count" and not (p.classes_per_client and 1 <= p.classes_per_client <= info.num_classes):
        raise ConfigError(
            f"partition.classes_per_client must be between 1 and {info.num_classes} (got {p.classes_per_client})"
        )
    _at_least(cfg, "seed", 0)
    _at_least(cfg, "num_clients", 1)
    if not 1 <= cfg.clients_per_round <= cfg.num_clients:
        raise ConfigError(
            f"clients_per_round must be between 1 and num_clients={cfg.num_clients} (got {cfg.clients_per_round})"
        )
    for key in ("num_rounds", "local.epochs", "local.batch_size", "eval.batch_size"):
        _at_least(cfg, key, 1)
    _at_least(cfg, "local.lr", 0, strict=True)
    _at_least(cfg, "local.momentum", 0)
    _at_least(cfg, "local.weight_decay", 0)
    for key in ("data.train_samples", "data.test_samples"):
        if OmegaConf.select(cfg, key) is not None:
            _at_least(cfg, key, 1)
    if cfg.data.train_samples is not None and cfg.data.train_samples < cfg.num_clients:
        raise ConfigError(f"data.train_samples={cfg.data.train_samples} is fewer than num_clients={cfg.num_clients}")
    _at_least(cfg, "simulation.client_resources.num_cpus", 0, strict=True)
    gpus = cfg.simulation.client_resources.num_gpus
    if gpus != "auto" and not (isinstance(gpus, (int, float)) and not isinstance(gpus, bool) and gpus >= 0):
        raise ConfigError(f"simulation.client_resources.num_gpus must be 'auto' or a number >= 0 (got {gpus})")
    _at_least(cfg, "simulation.round_timeout", 0, strict=True)
    if cfg.tensorboard not in ("auto", True, False):
        raise ConfigError(f"tensorboard must be auto, true or false (got {cfg.tensorboard})")
    if cfg.tensorboard is True and not tensorboard_available():
        raise ConfigError("tensorboard=true but the tensorboard package is not installed: "
                          'pip install "fedlora[tensorboard]", or leave tensorboard=auto')
    if cfg.simulation.backend != "ray":
        raise ConfigError(f"unknown simulation.backend '{cfg.simulation.backend}'; choose one of: ray")
    # A missing data set, or a factorization the model cannot take, stops the run here, before Ray starts.
    check_available(cfg.dataset.name, cfg.data.root, cfg.data.download)
    if cfg.method.factorization is not None:
        from fedlora.task import method_plan

        method_plan(cfg)


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def resolve(cfg: DictConfig) -> DictConfig:
    """A plain, validated copy of a composed config, with the choices left to fedlora filled in: the
    model for "auto" and the data root from FEDLORA_DATA."""
    import os

    from fedlora.data import DATASETS
    from fedlora.hf import PRETRAINED
    from fedlora.paths import absolute

    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    if cfg.model.name == "auto" and cfg.dataset.name in DATASETS:
        # model.hf alone names a pretrained model: the records say "hf", not the paper's CNN
        cfg.model.name = "hf" if cfg.model.hf is not None else DATASETS[cfg.dataset.name].default_model
    for key, value in PRETRAINED.get(cfg.model.name, {}).items():
        if cfg.model[key] is None:
            cfg.model[key] = value
    exists = not cfg.data.download  # a download creates the root
    if cfg.data.root is not None:
        cfg.data.root = absolute(cfg.data.root, "data.root", must_exist=exists)
    elif os.environ.get("FEDLORA_DATA"):
        cfg.data.root = absolute(os.environ["FEDLORA_DATA"], "FEDLORA_DATA", must_exist=exists)
    if cfg.data.cache_dir is not None:
        cfg.data.cache_dir = absolute(cfg.data.cache_dir, "data.cache_dir")
    validate(cfg)
    return cfg


def to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def from_json(text: str) -> DictConfig:
    return OmegaConf.create(json.loads(text))


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The config that `fedlora-sim --config-name CONFIG_NAME OVERRIDES...` would run, composed
    without launching anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
        raise ConfigError(f"{e}{cause}") from e
