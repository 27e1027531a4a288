"""Config schema and validation.

The dataclasses below are the schema: the keys and types of a run's config, with what each means.
The values live in the YAML files of `conf/` (`conf/config.yaml` and one file per group option),
which Hydra composes on top of this schema, so an unknown key or a wrong type fails at composition.
`validate` then checks what a type cannot express (names, ranges, cross-field rules), so that a user
mistake ends in one short message before any work starts. The `method` and `adapter` sections are
each checked against the dataclass of the method or adapter they name (`fedlora.methods`,
`fedlora.parametrizations.adapters`). What needs the data or a model is checked by
`fedlora.preflight`, before Ray starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from fedlora.errors import ConfigError
from fedlora.methods import METHODS, method_class
from fedlora.parametrizations.adapters import ADAPTERS
from fedlora.structured import as_dict, settings, typed


@dataclass
class DatasetConfig:
    # fmnist, svhn, cifar10, cifar100, agnews (classes and shapes: fedlora.data.DATASETS), or hf: a
    # user's own text or image data at `path` (fedlora/own_data.py), whose other settings are below
    name: str = MISSING
    path: Optional[str] = None  # a local CSV, TSV, JSON-lines or Parquet file, a folder, or a Hub id
    subset: Optional[str] = None  # a Hub data set's configuration (glue: sst2, ...)
    train_split: str = "train"
    test_split: Optional[str] = None  # none: a hold-out of test_fraction of the training split
    test_fraction: float = 0.2
    text: Any = "text"  # the text column, or [first, second] for sentence pairs
    label: str = "label"
    image: Optional[str] = None  # an image column instead of text (a folder of class sub-folders: image)
    image_size: Optional[int] = None  # resize every image to N x N (images of several sizes need it)
    # the class names in id order, which the labels are matched to as text (null: the data set's
    # ClassLabel names, or its sorted label values); the server sends them to nodes with their own data
    labels: Optional[list] = None
    # model.task=causal_lm: the instruction, the (optional) input and the response columns, and the
    # prompt, with {instruction} and {input} (null: Alpaca's)
    instruction: str = "instruction"
    input: str = "input"
    response: str = "response"
    template: Optional[str] = None


@dataclass
class ModelConfig:
    # a name in fedlora.models.MODELS or fedlora.hf.PRETRAINED, or "auto": the dataset's own model
    # ("hf" after resolving, when model.hf alone names a pretrained model)
    name: str = MISSING
    hf: Optional[str] = None  # pretrained models: a Hugging Face Hub id or a local path (null: the preset's)
    num_layers: Optional[int] = None  # pretrained models: keep only the first layers (quick tests)
    max_length: Optional[int] = None  # pretrained text models: tokens per text (null: the preset's)
    # classification (a new head over a pretrained encoder), or causal_lm: instruction tuning of a
    # causal language model (fedlora/causal.py), with dataset=hf
    task: str = "classification"
    # pretrained models on GPUs (fedlora/precision.py): the forward pass in bf16 or fp16 autocast, the
    # weights float32; activation checkpointing (recompute in the backward pass, for memory)
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    # model.task=causal_lm: a client's training examples packed into rows of max_length tokens (each
    # example still attending to itself only), instead of one example a row padded per batch
    packing: bool = False


@dataclass
class PartitionConfig:
    name: str = MISSING  # iid, dirichlet, label_count, shard, natural
    alpha: Optional[float] = None  # dirichlet: concentration; smaller is more skewed
    min_partition_size: Optional[int] = None  # dirichlet: resample until every client has this many
    classes_per_client: Optional[int] = None  # label_count: exactly this many classes per client
    shards_per_client: Optional[int] = None  # shard: label-sorted shards dealt to each client
    by: Optional[str] = None  # natural: the column (dataset=hf) whose every value is one client's data


@dataclass
class LocalConfig:  # clients' local training
    optimizer: str = MISSING  # sgd or adamw
    epochs: int = MISSING  # passes over the client's data per round, unless `steps` is set
    steps: Optional[int] = None  # a fixed number of optimiser steps per round instead of `epochs`
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
    # a deployment whose every node trains on its own local-data: the server reads no training data,
    # only the test split (dataset=hf: dataset.test_split, else dataset.train_split: all of a single
    # file; for a built-in data set its test files), or none at all
    # (dataset=hf without dataset.path, the clients evaluating under eval.clients=true)
    on_nodes: bool = False


@dataclass
class ClientResources:
    num_cpus: float = MISSING  # Ray CPUs per virtual client (Ray sets its torch threads to match)
    num_gpus: Any = MISSING  # "auto": a fifth of a GPU when one is present, none otherwise; or a number


@dataclass
class FaultsConfig:  # devices that drop, on purpose: seeded fractions of each round's sampled clients
    fail_rate: float = 0.0  # raise instead of training
    straggle_rate: float = 0.0  # reply only after simulation.round_timeout, when the server has stopped waiting


@dataclass
class SimulationConfig:
    backend: str = MISSING  # ray
    client_resources: ClientResources = field(default_factory=ClientResources)
    ray_address: Optional[str] = None  # a running Ray cluster ("host:port" or "auto"); null: a new local one
    ray_num_cpus: Optional[int] = None  # CPUs of a new local Ray instance; null: all
    round_timeout: float = MISSING  # seconds the server waits for a round's replies
    faults: FaultsConfig = field(default_factory=FaultsConfig)


@dataclass
class EvalConfig:
    batch_size: int = MISSING  # server-side evaluation on the test split
    # each client also evaluates the model it would start from (the global one, or its personalised
    # one) on a seeded held-out fraction of its partition, after every round; it trains on the rest
    clients: bool = False
    client_fraction: float = 0.2
    # model.task=causal_lm: also generate (greedy) the answers of the first `generate_examples` test
    # examples and record the share that is exactly the response (test_exact_match)
    generate: bool = False
    generate_examples: int = 50
    max_new_tokens: int = 32


@dataclass
class DPConfig:  # differential privacy (fedlora.dp); off unless noise_multiplier or epsilon is set
    # client: DP-SGD in each client's local training; server: central DP, each client's update clipped
    # on the server and the average noised (strategies/central_dp.py), for the methods that average
    where: str = "client"
    noise_multiplier: Optional[float] = None  # σ: the noise's standard deviation relative to max_grad_norm
    epsilon: Optional[float] = None  # or a target ε: σ such that a client training every round spends at most this
    max_grad_norm: float = 1.0  # C: each example's gradient (client), or each client's update (server), clipped to this norm
    delta: float = 1e-5


@dataclass
class CheckpointConfig:
    # a checkpoint every N rounds (0: none); auto: every round, spaced out only where writing one
    # would take more than a twentieth of the rounds' time. The last round's is always written.
    every: Any = "auto"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    # the method's own settings: its config dataclass (fedlora/methods/) says which, its YAML the values
    method: Any = MISSING
    adapter: Any = None  # pretrained models only: an adapter's settings (fedlora/parametrizations/adapters.py)
    local: LocalConfig = field(default_factory=LocalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = MISSING  # fixes partitions, initial model, client sampling and batch order
    num_clients: int = MISSING
    clients_per_round: int = MISSING
    num_rounds: int = MISSING
    min_replies: int = 1  # valid replies a round needs to be aggregated
    too_few: str = "keep"  # below min_replies: keep the global model, or retry with newly sampled clients
    dp: DPConfig = field(default_factory=DPConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: Optional[str] = None  # a run directory: go on from its last checkpoint (fedlora.checkpoint)
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


def _schemas(section: str) -> dict[str, type]:
    """Name -> config dataclass of every method (section "method") or adapter ("adapter")."""
    return {name: m.Config for name, m in METHODS.items()} if section == "method" else ADAPTERS


def _typed_section(cfg: DictConfig, section: str):
    """The run's `method` or `adapter` section as an instance of its dataclass."""
    name, schemas = cfg[section].name, _schemas(section)
    if name not in schemas:
        raise ConfigError(f"unknown {section} '{name}'; choose one of: {_choices(schemas)}")
    return typed(schemas[name], cfg[section], f"{section}={name}")


def _validate_pretrained(cfg: DictConfig, info) -> None:
    if cfg.model.name == "minilm" and not info.text:
        raise ConfigError(f"model 'minilm' is a pretrained text model; dataset '{cfg.dataset.name}' holds images "
                          "(model=vit, or model.hf=ID_OR_PATH of an image classifier)")
    if cfg.model.name == "vit" and info.text:
        raise ConfigError(f"model 'vit' is a pretrained image model; dataset '{cfg.dataset.name}' is text "
                          "(model=minilm, or model.hf=ID_OR_PATH of a sequence classifier)")
    if cfg.adapter is None:
        raise ConfigError("a pretrained model is fine-tuned through adapters: add adapter=lora (or "
                          f"{', '.join(sorted(a for a in ADAPTERS if a != 'lora'))})")
    _typed_section(cfg, "adapter").validate()
    if info.text:
        _at_least(cfg, "model.max_length", 1)


def _validate_method(cfg: DictConfig, pretrained: bool) -> None:
    _typed_section(cfg, "method").validate()
    method = method_class(cfg.method.name)
    adapter_methods = _choices(name for name, m in METHODS.items() if m.needs_adapter)
    if pretrained and not method.needs_adapter:
        raise ConfigError(f"method={cfg.method.name} trains a model from scratch; for a pretrained model choose "
                          f"method={adapter_methods.replace(', ', ', method=')}")
    if method.needs_adapter and not pretrained:
        raise ConfigError(f"method={cfg.method.name} aggregates adapters: it needs a pretrained model and an "
                          "adapter (dataset=agnews adapter=lora)")
    method.check(cfg)


def _validate_dataset(cfg: DictConfig) -> None:
    d = cfg.dataset
    if d.name != "hf":
        for key in ("path", "labels"):
            if d.get(key) is not None:
                raise ConfigError(f"dataset.{key} is for dataset=hf (a data set of one's own); dataset={d.name} is "
                                  "read from data.root")
        return
    causal = cfg.model.get("task") == "causal_lm"
    if d.get("labels") is not None:
        names = [str(n) for n in d.labels] if OmegaConf.is_list(d.labels) else []
        if causal or len(names) < 2 or len(set(names)) < len(names) or not all(names):
            raise ConfigError("dataset.labels names a classifier's classes: two or more distinct names, in id order "
                              f"(got {d.labels}{', and model.task=causal_lm has none' if causal else ''})")
    if cfg.data.get("on_nodes"):
        if d.get("image"):
            raise ConfigError("data.on_nodes=true: a node's own local-data holds text or instructions; images are "
                              "read from a dataset.path that the server and the nodes share")
        if not d.path:
            if not cfg.eval.clients:
                raise ConfigError("data.on_nodes=true without dataset.path: the server has no test data, so the "
                                  "clients must evaluate (eval.clients=true), or give the server a test file")
            if not causal and d.get("labels") is None:
                raise ConfigError("data.on_nodes=true without dataset.path: the server reads no labels, so name the "
                                  "run's classes with dataset.labels=[...]")
    elif not d.path:
        raise ConfigError("dataset=hf needs dataset.path: a local CSV, TSV, JSON-lines or Parquet file, a folder "
                          "(save_to_disk's, or of such files), or a Hugging Face Hub id")
    if d.test_split is None and not 0 < d.test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be in (0, 1) (got {d.test_fraction})")
    if d.get("image_size") is not None and not d.image_size >= 1:
        raise ConfigError(f"dataset.image_size must be >= 1 (got {d.image_size})")
    if d.get("image"):
        if d.image == d.label:
            raise ConfigError(f"dataset.image={d.image} is also the label column")
        return
    columns = [d.text] if isinstance(d.text, str) else list(d.text) if d.text is not None else []
    if not 1 <= len(columns) <= 2 or not all(isinstance(c, str) and c for c in columns):
        raise ConfigError(f"dataset.text must name a text column, or two for sentence pairs (got {d.text})")
    if d.label in columns:
        raise ConfigError(f"dataset.label={d.label} is also a text column")
    if d.template is not None:
        import string

        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(d.template) if f is not None}
        except ValueError as e:
            fields = {f"({e})"}
        if not fields <= {"instruction", "input"} or "instruction" not in fields:
            raise ConfigError(f"dataset.template must hold {{instruction}}, may hold {{input}}, and nothing else in "
                              f"braces (got {d.template!r})")


def _validate_task(cfg: DictConfig) -> None:
    task = cfg.model.get("task", "classification")  # absent in the config of a run made before it
    if task not in ("classification", "causal_lm"):
        raise ConfigError(f"model.task must be classification or causal_lm (got {task})")
    if task != "causal_lm":
        if cfg.eval.get("generate"):
            raise ConfigError("eval.generate=true generates answers: it is for model.task=causal_lm")
        if cfg.model.get("packing"):
            raise ConfigError("model.packing=true packs instructions into rows: it is for model.task=causal_lm")
        return
    if cfg.dataset.name != "hf":
        raise ConfigError(f"model.task=causal_lm tunes on instructions: use dataset=hf with dataset.path= a file or "
                          f"folder of instruction, input and response columns (dataset={cfg.dataset.name} is for "
                          "classification)")
    if cfg.model.hf is None:
        raise ConfigError("model.task=causal_lm needs model.hf=ID_OR_PATH of a causal language model (a local folder "
                          "offline)")
    if cfg.adapter is None:
        raise ConfigError("model.task=causal_lm fine-tunes through adapters: add adapter=lora (or another adapter)")
    if cfg.model.name in ("minilm", "vit"):
        raise ConfigError(f"model={cfg.model.name} is a classifier's encoder; model.task=causal_lm needs a causal LM: "
                          "model.hf=ID_OR_PATH (GPT-2, Llama, Qwen, SmolLM, ...)")
    if cfg.model.get("packing") and cfg.dp.where == "client" and (cfg.dp.noise_multiplier is not None
                                                         or cfg.dp.epsilon is not None):
        raise ConfigError("model.packing=true puts several examples in a row, and DP-SGD clips per row: the "
                          "privacy unit would no longer be an example; leave model.packing=false under DP-SGD")
    if cfg.eval.get("generate"):
        _at_least(cfg, "eval.generate_examples", 1)
        _at_least(cfg, "eval.max_new_tokens", 1)
    if cfg.partition.name == "label_count":  # dirichlet over a single class skews the clients' sizes
        raise ConfigError("partition=label_count gives each client some of the classes; instructions have none: use "
                          "partition=iid, or partition=dirichlet for clients of skewed sizes")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the valid choices for the first mistake found. Nothing is read from
    the disk and no model is built here: `fedlora.preflight` checks what needs them."""
    from fedlora.data import DATASETS, DatasetInfo
    from fedlora.hf import PRETRAINED
    from fedlora.models import MODELS
    from fedlora.partition import PARTITIONERS

    if cfg.dataset.name not in DATASETS:
        raise ConfigError(f"unknown dataset '{cfg.dataset.name}'; choose one of: {_choices(DATASETS)}")
    _validate_dataset(cfg)
    _validate_task(cfg)
    info = DATASETS[cfg.dataset.name]
    own_images = cfg.dataset.name == "hf" and cfg.dataset.get("image")  # their shape is known once they are read
    if own_images:
        info = DatasetInfo(0, (0, 0, 0), "")
    pretrained = cfg.model.name in PRETRAINED or cfg.model.hf is not None
    if pretrained:
        _validate_pretrained(cfg, info)
    else:
        if info.text:
            raise ConfigError(f"dataset '{cfg.dataset.name}' is text: it needs a pretrained model "
                              "(model=minilm, or model.hf=ID_OR_PATH) and an adapter (adapter=lora)")
        if cfg.model.name not in MODELS:
            raise ConfigError(f"unknown model '{cfg.model.name}'; choose one of: auto, "
                              f"{_choices(list(MODELS) + list(PRETRAINED))}")
        if MODELS[cfg.model.name].input_shape != info.shape and not own_images:  # those: preflight checks
            raise ConfigError(
                f"model '{cfg.model.name}' takes {MODELS[cfg.model.name].input_shape} inputs but dataset "
                f"'{cfg.dataset.name}' has {info.shape}; leave model=auto for the dataset's own model"
            )
        if cfg.adapter is not None and not method_class(cfg.method.name).needs_adapter:
            raise ConfigError(f"adapter={cfg.adapter.name} fine-tunes a pretrained model; model "
                              f"'{cfg.model.name}' trains from scratch (use method=fedmud... for low-rank updates)")
    _validate_method(cfg, pretrained)
    m, precision = cfg.model, cfg.model.get("precision", "fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"model.precision must be fp32, bf16 or fp16 (got {precision})")
    if (precision != "fp32" or m.get("gradient_checkpointing")) and cfg.adapter is None:
        raise ConfigError("model.precision and model.gradient_checkpointing are for pretrained models with an adapter; "
                          f"model={m.name} trains in float32")
    if precision == "fp16" and cfg.dp.where == "client" and (cfg.dp.noise_multiplier is not None
                                                               or cfg.dp.epsilon is not None):
        raise ConfigError("model.precision=fp16 scales the loss, which DP-SGD's per-example clipping cannot see: use "
                          "model.precision=bf16 with dp.where=client")
    if cfg.local.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"local.optimizer must be sgd or adamw (got {cfg.local.optimizer})")
    p = cfg.partition
    if p.name not in PARTITIONERS:
        raise ConfigError(f"unknown partition '{p.name}'; choose one of: {_choices(PARTITIONERS)}")
    if p.name == "dirichlet":
        _at_least(cfg, "partition.alpha", 0, strict=True)
        _at_least(cfg, "partition.min_partition_size", 0)
    if p.name == "shard":
        _at_least(cfg, "partition.shards_per_client", 1)
    if p.name == "natural" and (cfg.dataset.name != "hf" or not p.by):
        raise ConfigError("partition=natural gives one client per value of a column (a user or writer id): it needs "
                          "dataset=hf and partition.by=COLUMN")
    # dataset=hf's classes are known once its labels are read: fedlora.data.check_dataset checks its bound
    most = info.num_classes if cfg.dataset.name != "hf" else float("inf")
    if p.name == "label_count" and not (p.classes_per_client and 1 <= p.classes_per_client <= most):
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
    if cfg.local.steps is not None:
        _at_least(cfg, "local.steps", 1)
    if not 0 < cfg.eval.client_fraction < 1:
        raise ConfigError(f"eval.client_fraction must be in (0, 1) (got {cfg.eval.client_fraction})")
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
    if not 1 <= cfg.min_replies <= cfg.clients_per_round:
        raise ConfigError(f"min_replies must be between 1 and clients_per_round={cfg.clients_per_round} "
                          f"(got {cfg.min_replies})")
    if cfg.too_few not in ("keep", "retry"):
        raise ConfigError(f"too_few must be keep or retry (got {cfg.too_few})")
    rates = cfg.simulation.faults
    if not (0 <= rates.fail_rate <= 1 and 0 <= rates.straggle_rate <= 1 and rates.fail_rate + rates.straggle_rate <= 1):
        raise ConfigError("simulation.faults.fail_rate and straggle_rate must be in [0, 1], together at most 1 "
                          f"(got {rates.fail_rate} and {rates.straggle_rate})")
    dp = cfg.dp
    if dp.noise_multiplier is not None and dp.epsilon is not None:
        raise ConfigError("dp.noise_multiplier and dp.epsilon both set: give one (σ, or a target ε that σ is found for)")
    if dp.noise_multiplier is not None and not dp.noise_multiplier >= 0:
        raise ConfigError(f"dp.noise_multiplier must be >= 0 (got {dp.noise_multiplier})")
    if dp.epsilon is not None and not dp.epsilon > 0:
        raise ConfigError(f"dp.epsilon must be > 0 (got {dp.epsilon})")
    if not dp.max_grad_norm > 0 or not 0 < dp.delta < 1:
        raise ConfigError(f"dp.max_grad_norm must be > 0 and dp.delta in (0, 1) (got {dp.max_grad_norm}, {dp.delta})")
    if dp.where not in ("client", "server"):
        raise ConfigError(f"dp.where must be client (DP-SGD on each client) or server (central DP: clipped updates, "
                          f"a noised average) (got {dp.where})")
    central = dp.where == "server" and (dp.noise_multiplier is not None or dp.epsilon is not None)
    if central and cfg.too_few == "retry":
        raise ConfigError("dp.where=server divides each round's sum of updates by clients_per_round, so a round cannot "
                          "ask more clients (too_few=retry): use too_few=keep")
    if central and not method_class(cfg.method.name).averages():
        able = _choices(name for name, m in METHODS.items() if m.averages())
        raise ConfigError(f"dp.where=server clips each client's update and noises their average; method="
                          f"{cfg.method.name} combines the replies otherwise, so the noise would not bound what it "
                          f"releases: use dp.where=client, or one of the methods that average: {able}")
    every = cfg.checkpoint.every
    if every != "auto" and not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
        raise ConfigError(f"checkpoint.every must be auto or a number of rounds >= 0 (0: none; got {every})")


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _model_location(given: str) -> str:
    """model.hf: a local folder, made absolute (it must exist), or a Hub id such as org/name."""
    import os

    from fedlora.paths import absolute

    expanded = os.path.expanduser(given)
    if not (os.path.isabs(expanded) or given.startswith((".", "~")) or os.path.exists(expanded)):
        return given  # a Hub id
    path = absolute(given, "model.hf", must_exist=True)
    if not os.path.isdir(path):
        raise ConfigError(f"model.hf={given} does not exist as a folder: give the folder of a saved Hugging Face model "
                          "(what save_pretrained writes), or a Hub id such as org/name, which needs internet")
    return path


def _model_for_own_images(cfg: DictConfig) -> str:
    """The paper CNN whose input shape the user's images have (read here), for model=auto."""
    from fedlora.data import dataset_info
    from fedlora.models import model_for_shape

    info = dataset_info(cfg)
    model = model_for_shape(info.shape)
    if not model:
        raise ConfigError(f"dataset.path={cfg.dataset.path}: images of shape {info.shape} fit none of the paper's "
                          "CNNs ((1, 28, 28) or (3, 32, 32)): set dataset.image_size=28 or 32, or fine-tune a "
                          "pretrained image classifier (model.hf=ID_OR_PATH adapter=lora)")
    return model


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
    if cfg.dataset.get("path"):  # made absolute before model=auto reads one's own images there
        from fedlora.own_data import looks_local

        given = str(cfg.dataset.path)
        if looks_local(given) or os.path.exists(os.path.expanduser(given)):  # else a Hub id
            cfg.dataset.path = absolute(given, "dataset.path", must_exist=True)
    if cfg.model.name == "auto" and cfg.dataset.name in DATASETS:
        # model.hf alone names a pretrained model: the records say "hf", not the paper's CNN
        causal = cfg.model.get("task") == "causal_lm"  # no default causal LM: model.hf names one (validate says so)
        if cfg.model.hf is not None or causal:
            cfg.model.name = "hf"
        elif cfg.dataset.name == "hf" and cfg.dataset.get("image") and cfg.dataset.get("path"):
            _validate_dataset(cfg)  # before the images are read by what it checks
            cfg.model.name = _model_for_own_images(cfg)
        else:
            cfg.model.name = DATASETS[cfg.dataset.name].default_model
    for key, value in PRETRAINED.get(cfg.model.name, {}).items():
        if cfg.model[key] is None:
            cfg.model[key] = value
    if cfg.model.hf is not None:
        cfg.model.hf = _model_location(str(cfg.model.hf))
        text = DATASETS.get(cfg.dataset.name) and DATASETS[cfg.dataset.name].text and not cfg.dataset.get("image")
        if cfg.model.max_length is None and text:
            cfg.model.max_length = PRETRAINED["minilm"]["max_length"]  # a text model of one's own: MiniLM's default
    if cfg.model.get("task") == "causal_lm" and cfg.adapter is not None and list(cfg.adapter.train) == ["classifier"]:
        cfg.adapter.train = []  # the adapters' default trains a classifier's new head, which a causal LM has not
    exists = not cfg.data.download  # a download creates the root
    if cfg.data.root is not None:
        cfg.data.root = absolute(cfg.data.root, "data.root", must_exist=exists)
    elif os.environ.get("FEDLORA_DATA"):
        cfg.data.root = absolute(os.environ["FEDLORA_DATA"], "FEDLORA_DATA", must_exist=exists)
    if cfg.data.cache_dir is not None:
        cfg.data.cache_dir = absolute(cfg.data.cache_dir, "data.cache_dir")
    if cfg.resume is not None:
        cfg.resume = absolute(cfg.resume, "resume", must_exist=True)
    validate(cfg)
    # every setting of the method and the adapter written out, defaults included, for the records
    for section in ("method", "adapter"):
        if cfg[section] is not None:
            cfg[section] = as_dict(_typed_section(cfg, section))
    return cfg


def to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def from_json(text: str) -> DictConfig:
    return OmegaConf.create(json.loads(text))


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The config that `fedlora-sim --config-name CONFIG_NAME OVERRIDES...` would run, composed
    without launching anything."""
    import re

    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    try:
        if GlobalHydra.instance().is_initialized():  # inside fedlora-sim (a resume): its own search path
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_module(config_module="conf", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
        unknown = re.match(r"Could not override '((method|adapter)\.[\w.]+)'", str(e))
        if unknown:  # a setting that the chosen method or adapter does not have: say which it has
            key, section = unknown.groups()
            chosen = compose([o for o in overrides if not o.lstrip("+~").startswith(key)], config_name)[section]
            schemas = _schemas(section)
            if chosen is not None and chosen.name in schemas:
                raise ConfigError(f"{key} is not a setting of {section}={chosen.name}; its settings: "
                                  f"{settings(schemas[chosen.name])}") from e
        raise ConfigError(f"{e}{cause}") from e
