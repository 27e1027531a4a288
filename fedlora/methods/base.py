"""A federated method: what a client trains, what travels each way, and how the server combines.

`Method` is FedAvg. A method subclasses it (or one of the two families below) and overrides only what
it does differently; it registers itself by name (`registry.register_method`) and brings its own
config dataclass, which the `method` section of a run's config is checked against. The ServerApp and
every ClientApp build the same Method from the run's config, so each rule is written once and both
sides use it:

1. what a client trains: `build` (the model as the method trains it, from the dense model) and
   `regenerate` (what every process draws itself from the run seed for a round: frozen factors,
   factors redrawn that round);
2. what travels: `global_keys` (the state that, with the seeds, is the global model), `down_keys`
   (what a sampled client receives in a round), `up_keys` (what it sends back);
3. how the server combines: `aggregate`, which writes the new global state into the server's model;
   and the round hooks: `start_round` (FedMUD's fold and redraw, on the server and on every replica),
   `broadcasts` (`method.downlink=broadcast_update`: every client keeps a replica of the global model
   and is sent, after each round, what `broadcast` says and applies it as `apply_broadcast` says).

The families: `FactorizedMethod` (FedMUD, FedLMT, FedPara: the adapted layers of a model trained from
scratch, factorized to a target uplink ratio) and `AdapterMethod` (FedIT, FFA-LoRA, LoRA-FAIR,
FlexLoRA: the configured adapter on a pretrained model).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import MISSING, DictConfig
from torch import nn

from fedlora.aggregate import Update, weighted_mean, weights
from fedlora.errors import ConfigError
from fedlora.ledger import serialized_bytes
from fedlora.models import dense_model
from fedlora.parametrizations.adapters import ADAPTERS, AdapterConfig, inject_adapters
from fedlora.parametrizations.base import delta_key, delta_layers, reset_deltas
from fedlora.parametrizations.factorizations import KronShape, factorize
from fedlora.parametrizations.sizing import Plan, plan_sizes
from fedlora.seeds import derive_seed
from fedlora.state import load_arrays, state_tensors
from fedlora.structured import typed


@dataclass
class MethodConfig:
    """What every method's config holds; a method's own dataclass adds its settings."""

    name: str = MISSING  # the method's registered name (conf/method/NAME.yaml)

    def validate(self) -> None:
        """Raise ConfigError for a value that its type cannot rule out."""


DOWNLINKS = ("global", "broadcast_update")


@dataclass
class DownlinkConfig(MethodConfig):
    """The config of a method that can broadcast: `global`, sampled clients receive the global state;
    `broadcast_update`, every client keeps a replica and receives each round's change after the round."""

    downlink: str = "global"

    def validate(self) -> None:
        super().validate()
        if self.downlink not in DOWNLINKS:
            raise ConfigError(f"method.downlink must be global or broadcast_update (got {self.downlink})")


def trained_keys(model: nn.Module) -> list[str]:
    """The state entries that local training changes: the trainable parameters, and the floating-point
    buffers (BatchNorm's statistics) of the modules that train. BatchNorm's integer batch counter
    stays home: with a set momentum it is never read."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    training = {name for name, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    keys = []
    for key in model.state_dict():
        if key in params:
            if params[key].requires_grad:
                keys.append(key)
        elif key in buffers and buffers[key].is_floating_point() and key.rpartition(".")[0] in training:
            keys.append(key)
    return keys


def folded_keys(model: nn.Module) -> list[str]:
    """The trained state entries and the frozen weights W of the delta layers: the global state of a
    method that folds updates into W (FedMUD, FLoRA, FedEx-LoRA)."""
    keys = set(trained_keys(model)) | {f"{name}.weight" for name, _ in delta_layers(model)}
    return [k for k in model.state_dict() if k in keys]


class Method:
    """FedAvg (McMahan et al. 2017): clients train the whole model; the server averages what they
    send, weighted by their numbers of examples."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_adapter: ClassVar[bool] = False  # fine-tunes a pretrained model through the `adapter` config

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg  # the run's resolved config
        self.config = typed(self.Config, cfg.method, f"method={cfg.method.name}")

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """Raise ConfigError where the rest of the run's config does not go with this method."""

    # --- 1. what a client trains ------------------------------------------------------------------
    def build(self, dense: nn.Module) -> nn.Module:
        """The model as this method trains it, from the dense model (drawn from the run seed, or
        pretrained), with whatever it draws drawn for round 0."""
        return dense

    def initial_model(self, rank: int | None = None) -> nn.Module:
        """The global model as the run starts, built as the server and every client build it (with
        adapters of a client's own `rank`, under heterogeneous ranks: `AdapterMethod`)."""
        return self.build(dense_model(self.cfg))

    def rank_of(self, partition_id: int) -> int | None:
        """The adapter rank of a client, under heterogeneous ranks; None: the global model's."""
        return None

    def regenerate(self, model: nn.Module, server_round: int) -> None:
        """Draw what every process draws itself for `server_round` (0: the initial model)."""

    def load(self, model: nn.Module, arrays: Mapping, server_round: int, required: Iterable[str]) -> nn.Module:
        """The model as of `server_round` from what travelled: what every process draws for the round,
        then the arrays, which must hold every key of `required`. A client does this with what it
        received, the server with the global arrays it evaluates, a replica with its own."""
        self.regenerate(model, server_round)
        return load_arrays(model, arrays, required=required)

    def set_trainable(self, model: nn.Module, server_round: int) -> None:
        """Which parameters a client trains in `server_round`, before it trains: those that train as
        built, unless the method alternates (RoLoRA)."""

    def factor_seed(self, server_round: int) -> int:
        """The seed of the factors in use in `server_round` (0: the initial model); drawn once, unless
        the method redraws them."""
        return derive_seed(self.cfg.seed, "factors", 0)

    # --- round hooks ------------------------------------------------------------------------------
    def start_round(self, model: nn.Module, server_round: int) -> None:
        """What the global model goes through as a round starts, on the server and on every replica."""

    @property
    def broadcasts(self) -> bool:
        """Whether every client keeps a replica of the global model, sent each round's change after the
        round (`broadcast`), instead of receiving the model when sampled (`method.downlink`)."""
        return getattr(self.config, "downlink", "global") == "broadcast_update"

    def broadcast(self, model: nn.Module, server_round: int) -> dict[str, torch.Tensor]:
        """What every client is sent after `server_round` has been aggregated into `model`: by default
        the arrays that clients send up, as aggregated."""
        return state_tensors(model, self.up_keys(model, server_round))

    def apply_broadcast(self, model: nn.Module, arrays: Mapping, server_round: int) -> None:
        """A replica's part of `server_round`'s aggregation, from what `broadcast` sent: afterwards the
        replica is the server's global model as the next round starts."""
        load_arrays(model, arrays, required=arrays.keys())
        self.start_round(model, server_round + 1)

    def round_figures(self) -> dict[str, float]:
        """Figures of the last aggregation for the round's record (FedEx-LoRA's approximation error)."""
        return {}

    # --- 2. what travels --------------------------------------------------------------------------
    def global_keys(self, model: nn.Module) -> list[str]:
        """The state entries that, with what every process draws from the seeds, make the global model."""
        return trained_keys(model)

    # --- an initialisation from the clients' data, before round 1 (Fed-SB) -------------------------------
    initialises: ClassVar[bool] = False

    def init_keys(self, model: nn.Module) -> list[str]:
        """What an init client sends."""
        return []

    def init_update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[dict, int, float]:
        """An init client's arrays (the `init_keys`), its number of examples and its loss."""
        raise NotImplementedError

    def initialise(self, model: nn.Module, updates: list[Update]) -> None:
        """Set the global model from the init clients' replies."""

    def fixed_keys(self, model: nn.Module) -> list[str]:
        """Global state that never changes (Fed-SB's B and A): a client is sent it the first time it is
        sampled, and keeps it in its node state."""
        return []

    def personal_keys(self, model: nn.Module) -> list[str]:
        """What each client keeps for itself between rounds and never sends (FedSA-LoRA's B)."""
        return []

    def down_keys(self, model: nn.Module, server_round: int) -> list[str]:
        """What a client sampled in `server_round` receives."""
        return [] if self.broadcasts else self.global_keys(model)

    def up_keys(self, model: nn.Module, server_round: int) -> list[str]:
        """What a client sends back after training in `server_round`."""
        return trained_keys(model)

    # --- 3. how the server combines -------------------------------------------------------------
    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        """Combine the valid replies of a round (in partition order) into the global model, in place."""
        load_arrays(model, weighted_mean(updates))

    @classmethod
    def averages(cls) -> bool:
        """Whether the global state that travels up is the weighted mean of the replies, all the server
        does besides what every process does alike (the FedAvg family): what central DP can clip and
        noise. Not so for a method that combines replies otherwise, or initialises from the clients'
        data (what Fed-SB's clients send before round 1 is not noised)."""
        return cls.aggregate is Method.aggregate and not cls.initialises

    def describe(self, model: nn.Module) -> dict | None:
        """Facts about the method for the run's summary (FedMUD's compression), or None."""
        return None


class FactorizedMethod(Method):
    """The adapted layers (Conv2d and Linear, the first and last kept dense) of a model trained from
    scratch, factorized with per-layer sizes chosen for a target uplink ratio; the factors are drawn
    from the run seed and averaged like any other weight."""

    factorization: ClassVar[str]  # a key of parametrizations.factorizations.KINDS

    @dataclass
    class Config(MethodConfig):
        compression_ratio: float = MISSING  # target uplink bytes relative to the dense model's (1/32 = 0.03125)
        dense_first_last: bool = True  # keep the first and the last adapted layer dense

        def validate(self) -> None:
            if not 0 < self.compression_ratio < 1:
                raise ConfigError("method.compression_ratio must be in (0, 1), e.g. 0.03125 for 1/32 "
                                  f"(got {self.compression_ratio})")

    magnitude = 0.0  # the scale of the random factors of an update; a factorized weight takes its layer's

    def plan(self, dense: nn.Module) -> Plan:
        return plan_sizes(dense, self.factorization, self.config.compression_ratio, self.config.dense_first_last)

    def build(self, dense: nn.Module) -> nn.Module:
        model = factorize(dense, self.factorization, self.plan(dense).sizes, self.magnitude)
        reset_deltas(model, self.factor_seed(0))
        return model

    def describe(self, model: nn.Module) -> dict:
        """The uplink of a client against the dense model's, measured on the serialized arrays, with
        the planned sizes, and why a target is out of reach."""
        dense = dense_model(self.cfg)
        plan = self.plan(dense)
        up = sum(serialized_bytes(t) for t in state_tensors(model, self.up_keys(model, 1)).values())
        full = sum(serialized_bytes(t) for t in state_tensors(dense, trained_keys(dense)).values())
        achieved = up / full
        return {"factorization": self.factorization, "target": plan.target, "achieved": achieved,
                "within_5_percent": abs(achieved - plan.target) <= 0.05 * plan.target, "note": plan.note,
                "uplink_bytes_per_client": up, "dense_bytes_per_client": full,
                "layers": {name: str(size) if isinstance(size, KronShape) else f"rank {size}"
                           for name, size in plan.sizes.items()}}


def mean_update(model: nn.Module, updates: list[Update]) -> dict[str, torch.Tensor]:
    """Σ_k p_k ΔW_k of each adapted layer (ΔW unscaled: B A for LoRA), p_k the clients' shares of the
    examples: what the clients' updates average to, which averaging their factors does not give.
    Each update is loaded into `model` in turn, and the model's own values are put back after."""
    mean: dict[str, torch.Tensor] = {}
    before = state_tensors(model, updates[0].arrays)
    with torch.no_grad():
        for update, share in zip(updates, weights(updates)):
            load_arrays(model, update.arrays)
            for name, layer in delta_layers(model):
                mean[name] = mean.get(name, 0) + layer.delta.matrix() * share
    load_arrays(model, before)
    return mean


def mean_besides(model: nn.Module, updates: list[Update], factors: Iterable[str]) -> dict:
    """The example-weighted mean of every array of the updates but the delta layers' `factors` (the
    head, and whatever else trains besides the adapters), for a method that combines those factors
    itself."""
    skip = {delta_key(name, f) for name, _ in delta_layers(model) for f in factors}
    return weighted_mean(updates, [k for k in updates[0].arrays if k not in skip])


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


class AdapterMethod(Method):
    """FedAvg over the configured adapter (`adapter=lora`, ...) on a pretrained model: the pretrained
    weights stay frozen and never travel; the adapters and the new head train and travel."""

    needs_adapter = True
    # the adapters the method's math needs (None: any), and why, for the error that refuses the others
    adapters: ClassVar[tuple[str, ...] | None] = None
    adapters_because: ClassVar[str] = ""
    heterogeneous: ClassVar[bool] = False  # combines clients of different adapter ranks (adapter.ranks)

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.adapter: AdapterConfig = typed(ADAPTERS[cfg.adapter.name], cfg.adapter, f"adapter={cfg.adapter.name}")
        self._tiers: list[int] = []
        if self.adapter.ranks:  # a seeded order of the partitions, dealt to the rank tiers in turn
            order = random.Random(derive_seed(cfg.seed, "rank-tiers")).sample(range(cfg.num_clients), cfg.num_clients)
            self._tiers = [0] * cfg.num_clients
            for position, pid in enumerate(order):
                self._tiers[pid] = self.adapter.ranks[position % len(self.adapter.ranks)]

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        if cfg.adapter is None:
            return
        if cls.adapters is not None and cfg.adapter.name not in cls.adapters:
            raise ConfigError(f"method={cls.name} {cls.adapters_because}; adapter={cfg.adapter.name} is not one of "
                              f"them: use adapter={' or '.join(cls.adapters)}")
        if cfg.adapter.get("ranks") and not cls.heterogeneous:
            able = sorted(m.name for m in _subclasses(AdapterMethod) if m.heterogeneous and m.name)
            raise ConfigError(f"adapter.ranks gives clients different ranks; method={cls.name} averages adapters of one "
                              f"rank: use method={', '.join(able)}, or leave adapter.ranks out")
        if cfg.adapter.get("ranks") and cfg.adapter.get("subtract_initial"):
            raise ConfigError("adapter.ranks with adapter.subtract_initial=true: a client of a lower rank would take its own "
                              "initial product out of the frozen weights, not the global one; use adapter=lora, or "
                              "adapter.subtract_initial=false")

    def rank_of(self, partition_id: int) -> int | None:
        return self._tiers[partition_id] if self._tiers else None

    def initial_model(self, rank: int | None = None) -> nn.Module:
        return self.build(dense_model(self.cfg), rank)

    def build(self, dense: nn.Module, rank: int | None = None) -> nn.Module:
        """The pretrained model with the configured adapter (of `rank`, where given) on its targets."""
        inject_adapters(dense, self.adapter, rank)
        reset_deltas(dense, self.factor_seed(0))
        return dense

