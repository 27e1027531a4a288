"""Low-rank adapters for fine-tuning a pretrained model: LoRA (zero or non-zero initialisation) and BoRA.

Each is a `Delta` (`base.py`) on a frozen layer W (m x n), scaled by alpha / r, with dropout on its
input, as PEFT does:
- `LoRA`: ΔW = B A, A (r x n), B (m x r). Zero initialisation: A Kaiming-uniform (PEFT's), B = 0, so
  the model starts at the pretrained one. Non-zero initialisation (ICML 2025): A and B both drawn from
  U(-sqrt(β/n), sqrt(β/n)) (β per factor); with `subtract_initial` the initial product is taken out of
  the frozen weight, so the model still starts exactly at the pretrained one.
- `BoRA` (block-diversified LoRA): A in b column blocks A_j, B in b row blocks B_i (uneven when a
  dimension is not divisible by b); block (i, j) of ΔW is B_i Σ_ij A_j with
  Σ_ij = diag(exp(σ_ij / mean|σ|)), σ (b x b x r) trainable, drawn like A; B = 0. (m + n) r + b² r
  trainable parameters; the update's rank can reach b r.

An adapter is named in the `adapter` config group; `ADAPTERS` maps each name to its Delta and its
config dataclass, and `inject_adapters` puts the configured one on a model's target layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from omegaconf import MISSING
from torch import nn

from fedlora.errors import ConfigError
from fedlora.parametrizations.base import Delta, DeltaLayer, adaptable_layers, inject, matches, matrix_shape
from fedlora.parametrizations.factorizations import (AggregationAwareKronecker, AggregationAwareLowRank, Kronecker,
                                                     KronShape)
from fedlora.parametrizations.sizing import kron_shapes
from fedlora.seeds import cpu_generator, uniform


def _kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    # nn.init.kaiming_uniform_(w, a=sqrt(5)), as nn.Linear and PEFT's lora_A: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return uniform(shape, 1.0 / math.sqrt(shape[1]), gen)


def _check_size(key: str, value: int, m: int, n: int) -> None:
    # what only the layer can tell; the configs check the values on their own (AdapterConfig.validate)
    if not 1 <= value <= min(m, n):
        raise ConfigError(f"adapter.{key}={value} must be between 1 and min(in, out) = {min(m, n)} of the adapted layers")


class LoRA(Delta):
    factored = True  # applies its factors to x without forming ΔW

    def __init__(self, m: int, n: int, r: int, init: str = "zero", beta_a: float = 1.0, beta_b: float = 1.0):
        super().__init__(m, n)
        _check_size("r", r, m, n)
        self.r, self.init, self.beta_a, self.beta_b = r, init, beta_a, beta_b
        self.lora_A = nn.Parameter(torch.zeros(r, n))
        self.lora_B = nn.Parameter(torch.zeros(m, r))

    def reset(self, seed: int) -> None:
        gen = cpu_generator(seed)
        with torch.no_grad():
            if self.init == "zero":
                self.lora_A.copy_(_kaiming_uniform((self.r, self.n), gen))
                self.lora_B.zero_()
            elif self.init == "nonzero":
                for p, beta in ((self.lora_A, self.beta_a), (self.lora_B, self.beta_b)):
                    p.copy_(uniform(p.shape, math.sqrt(beta / self.n), gen))
            else:
                raise ValueError(f"LoRA init must be zero or nonzero (got {self.init})")

    def matrix(self, lora_B: torch.Tensor | None = None) -> torch.Tensor:
        """B A, with `lora_B` in place of the adapter's own B if given."""
        return (self.lora_B if lora_B is None else lora_B) @ self.lora_A

    def forward(self, x: torch.Tensor, scaling: float) -> torch.Tensor:
        # two thin matmuls instead of forming the m x n update
        return (x @ self.lora_A.T @ self.lora_B.T) * scaling


class LoRASB(Delta):
    """LoRA-SB's adapter (LoRA-XS's architecture): ΔW = B R A, B (m x r) and A (r x n) frozen, R (r x r)
    trained. `reset` draws B and A Kaiming-uniform and sets R = 0 (ΔW = 0); Fed-SB then sets all three
    from the truncated SVD of an approximation of the first full update (`set_from_update`)."""

    factored = True  # applies its factors to x without forming ΔW

    def __init__(self, m: int, n: int, r: int):
        super().__init__(m, n)
        _check_size("r", r, m, n)
        self.r = r
        self.lora_A = nn.Parameter(torch.zeros(r, n), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(m, r), requires_grad=False)
        self.lora_R = nn.Parameter(torch.zeros(r, r))

    def reset(self, seed: int) -> None:
        gen = cpu_generator(seed)
        with torch.no_grad():
            self.lora_A.copy_(_kaiming_uniform((self.r, self.n), gen))
            self.lora_B.copy_(_kaiming_uniform((self.m, self.r), gen))
            self.lora_R.zero_()

    def set_from_update(self, update: torch.Tensor, scaling: float) -> None:
        """B = U_r, R = Σ_r / s, A = V_rᵀ from the SVD of `update` (m x n): s B R A is its best rank-r
        approximation, with orthonormal B and A."""
        u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
        with torch.no_grad():
            self.lora_B.copy_(u[:, :self.r])
            self.lora_R.copy_(torch.diag(s[:self.r]) / scaling)
            self.lora_A.copy_(vh[:self.r])

    def matrix(self) -> torch.Tensor:
        return self.lora_B @ self.lora_R @ self.lora_A

    def forward(self, x: torch.Tensor, scaling: float) -> torch.Tensor:
        return (x @ self.lora_A.T @ self.lora_R.T @ self.lora_B.T) * scaling


def _splits(size: int, b: int) -> list[int]:
    """b block sizes that sum to size, the first ones one larger when size is not divisible by b."""
    return [size // b + (1 if i < size % b else 0) for i in range(b)]


class BoRA(Delta):
    factored = True  # applies its factors to x without forming ΔW

    def __init__(self, m: int, n: int, r: int, blocks: int = 4):
        super().__init__(m, n)
        _check_size("r", r, m, n)
        _check_size("blocks", blocks, m, n)
        self.r, self.blocks = r, blocks
        self.row_sizes, self.col_sizes = _splits(m, blocks), _splits(n, blocks)
        self.lora_A = nn.Parameter(torch.zeros(r, n))
        self.lora_B = nn.Parameter(torch.zeros(m, r))
        self.sigma = nn.Parameter(torch.zeros(blocks, blocks, r))

    def reset(self, seed: int) -> None:
        gen = cpu_generator(seed)
        with torch.no_grad():
            self.lora_A.copy_(_kaiming_uniform((self.r, self.n), gen))
            self.sigma.copy_(uniform(self.sigma.shape, 1.0 / math.sqrt(self.n), gen))  # "like A"
            self.lora_B.zero_()

    def diagonals(self) -> torch.Tensor:
        """Σ's diagonals, (b, b, r): exp(σ / mean|σ|)."""
        return torch.exp(self.sigma / self.sigma.abs().mean())

    def matrix(self, lora_B: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks B_i Σ_ij A_j, with `lora_B` in place of the adapter's own B if given."""
        d = self.diagonals()
        a_blocks = torch.split(self.lora_A, self.col_sizes, dim=1)
        b_blocks = torch.split(self.lora_B if lora_B is None else lora_B, self.row_sizes, dim=0)
        rows = [torch.cat([(b_i * d[i, j]) @ a_j for j, a_j in enumerate(a_blocks)], dim=1)
                for i, b_i in enumerate(b_blocks)]
        return torch.cat(rows, dim=0)

    def forward(self, x: torch.Tensor, scaling: float) -> torch.Tensor:
        # without forming the m x n update: z_j = A_j x_j for each column block j, then row block i
        # is B_i (Σ_j Σ_ij z_j); thin matmuls of rank r only
        d = self.diagonals()
        z = torch.stack([x_j @ a_j.T for x_j, a_j in zip(torch.split(x, self.col_sizes, dim=-1),
                                                         torch.split(self.lora_A, self.col_sizes, dim=1))], dim=-2)
        mixed = torch.einsum("...jr,ijr->...ir", z, d)  # (..., b, r): row block i's Σ_j Σ_ij z_j
        b_blocks = torch.split(self.lora_B, self.row_sizes, dim=0)
        return torch.cat([mixed[..., i, :] @ b_i.T for i, b_i in enumerate(b_blocks)], dim=-1) * scaling


# ---------------------------------------------------------------- configs and injection


@dataclass
class AdapterConfig:
    """What every adapter takes (`conf/adapter/NAME.yaml` gives the values)."""

    name: str = MISSING  # a key of ADAPTERS
    r: int = MISSING
    alpha: float = MISSING  # the update is scaled by alpha / r
    dropout: float = MISSING  # on the adapter's input
    targets: list[str] = MISSING  # layers to adapt: names or name suffixes (PEFT's target_modules), or re:PATTERN
    train: list[str] = MISSING  # modules trained as they are, besides the adapters (the new classifier head)
    # heterogeneous ranks: the clients' ranks, in tiers assigned to partitions at random (seeded), each at
    # most r (the global adapter's rank); every client scales by alpha / r, so a client's factors are the
    # first columns of B and rows of A of the global adapter
    ranks: Optional[list[int]] = None

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"adapter.r must be >= 1 (got {self.r})")
        if not self.alpha > 0:
            raise ConfigError(f"adapter.alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout must be in [0, 1) (got {self.dropout})")
        if not self.targets:
            raise ConfigError("adapter.targets must name the layers to adapt, e.g. [query, value]")
        if self.ranks is not None and not (self.ranks and all(1 <= k <= self.r for k in self.ranks)):
            raise ConfigError(f"adapter.ranks must list ranks between 1 and adapter.r={self.r} (got {list(self.ranks)})")

    def delta(self, m: int, n: int, r: int | None = None) -> Delta:
        """The adapter of an m x n layer, at rank `r` (a client's, under heterogeneous ranks) or its own."""
        raise NotImplementedError

    subtract_initial = False  # take the initial product out of the frozen weight (LoRA's non-zero init)


@dataclass
class LoRAConfig(AdapterConfig):
    init: str = MISSING  # zero (B = 0) or nonzero (A and B from U(-sqrt(beta/n), sqrt(beta/n)))
    beta_a: float = 1.0  # nonzero init: beta of A
    beta_b: float = 1.0  # nonzero init: beta of B
    subtract_initial: bool = False  # nonzero init: take the initial product out of the frozen weight

    def validate(self) -> None:
        super().validate()
        if self.init not in ("zero", "nonzero"):
            raise ConfigError(f"adapter.init must be zero or nonzero (got {self.init})")

    def delta(self, m: int, n: int, r: int | None = None) -> Delta:
        return LoRA(m, n, r or self.r, self.init, self.beta_a, self.beta_b)


@dataclass
class BoRAConfig(AdapterConfig):
    blocks: int = MISSING  # b blocks of A's columns and B's rows

    def validate(self) -> None:
        super().validate()
        if self.blocks < 1:
            raise ConfigError(f"adapter.blocks must be >= 1 (got {self.blocks})")

    def delta(self, m: int, n: int, r: int | None = None) -> Delta:
        return BoRA(m, n, self.r, self.blocks)


@dataclass
class LoRASBConfig(AdapterConfig):
    """LoRA-SB: r² trainable numbers a layer (R), B and A frozen."""

    def delta(self, m: int, n: int, r: int | None = None) -> Delta:
        return LoRASB(m, n, r or self.r)


@dataclass
class DecomposedConfig(AdapterConfig):
    """FedMUD's decompositions (`factorizations.py`) as adapters on a pretrained layer: its random
    factors drawn from U(-a, a), by default a = 1/sqrt(n) (LoRA's A), its trained ones from zero, so
    the model starts at the pretrained one."""

    init_magnitude: Optional[float] = None  # a; null: 1/sqrt(in) of each layer

    def validate(self) -> None:
        super().validate()
        if self.init_magnitude is not None and not self.init_magnitude > 0:
            raise ConfigError(f"adapter.init_magnitude must be > 0 (got {self.init_magnitude})")

    def magnitude(self, n: int) -> float:
        return self.init_magnitude if self.init_magnitude is not None else 1.0 / math.sqrt(n)


@dataclass
class AADLoRAConfig(DecomposedConfig):
    """ΔW = L1 R1 + L2 R2 (`AggregationAwareLowRank`): L1 (m x r) and R2 (r x n) frozen from the seed,
    R1 and L2 trained from zero. LoRA's (m + n) r trainable numbers; linear in them, so averaging them
    averages the updates exactly; the update's rank reaches 2r."""

    def delta(self, m: int, n: int, r: int | None = None) -> Delta:
        _check_size("r", self.r, m, n)
        return AggregationAwareLowRank(m, n, self.r, self.magnitude(n))


def kron_shape_for(m: int, n: int, r: int) -> KronShape:
    """The grid of Kronecker blocks with the most trainable numbers of one term that LoRA of rank r
    would train on an m x n layer ((m + n) r), the highest rank first among equals."""
    budget = (m + n) * r
    fitting = [s for s in kron_shapes(m, n) if s.count <= budget]
    if not fitting:
        raise ConfigError(f"no grid of Kronecker blocks on a {m}x{n} layer trains at most (m + n) r = {budget} "
                          f"numbers: raise adapter.r")
    return max(fitting, key=lambda s: (s.count, s.max_rank, s.blocks))


@dataclass
class KronConfig(DecomposedConfig):
    """BKD on a pretrained layer: ΔW a grid of Kronecker blocks A ⊗ B (`Kronecker`), A random, B zero,
    both trained, sized to train as many numbers as LoRA of rank r (at most). Inexact when averaged
    (A and B both train)."""

    def delta(self, m: int, n: int, r: int | None = None) -> Delta:
        return Kronecker(m, n, kron_shape_for(m, n, self.r), self.magnitude(n))


@dataclass
class KronAADConfig(DecomposedConfig):
    """BKD with AAD: each block A1 ⊗ B1 + A2 ⊗ B2 (`AggregationAwareKronecker`), A1 and B2 frozen,
    B1 and A2 trained from zero; the grid sized so that the trained B1 and A2 together train as many
    numbers as LoRA of rank r (at most). Exact when averaged."""

    def delta(self, m: int, n: int, r: int | None = None) -> Delta:
        return AggregationAwareKronecker(m, n, kron_shape_for(m, n, self.r), self.magnitude(n))


# adapter name (conf/adapter/<name>.yaml) -> its config; the config builds the Delta
ADAPTERS: dict[str, type[AdapterConfig]] = {
    "lora": LoRAConfig, "lora_nonzero": LoRAConfig, "bora": BoRAConfig,
    "aad_lora": AADLoRAConfig, "kron": KronConfig, "kron_aad": KronAADConfig, "lora_sb": LoRASBConfig,
}


def inject_adapters(model: nn.Module, config: AdapterConfig, rank: int | None = None) -> list[str]:
    """Freeze the model, put the configured adapter on every Linear (or Conv2d) layer that
    `config.targets` names (at `rank`, a client's own, where given; scaled by alpha / adapter.r
    whatever the rank), and keep trainable the modules that `config.train` names (a new head).
    Returns the adapted layers' names."""
    model.requires_grad_(False)
    layers = adaptable_layers(model, config.targets)
    if not layers:
        names = [n for n, _ in adaptable_layers(model)]
        raise ConfigError(f"no Linear or Conv2d layer matches adapter.targets {list(config.targets)}; the model's "
                          f"layers are named like: {', '.join(names[:6])}")

    def make(name: str, base: nn.Module) -> DeltaLayer:
        m, n = matrix_shape(base.weight.shape)
        linear = isinstance(base, nn.Linear)
        if config.dropout > 0 and not linear:
            raise ConfigError(f"adapter.dropout={config.dropout} applies to a Linear layer's input; {name} is a "
                              "Conv2d: set adapter.dropout=0 or leave convolutions out of adapter.targets")
        return DeltaLayer(base, config.delta(m, n, rank), scaling=config.alpha / config.r, dropout=config.dropout,
                          additive=linear, subtract_initial=config.subtract_initial)

    names = inject(model, layers, make)
    trained = [m for n, m in model.named_modules() if matches(n, config.train)]
    if config.train and not trained:
        raise ConfigError(f"adapter.train {list(config.train)} names no module of the model")
    for module in trained:
        module.requires_grad_(True)
    return names


def at_rank(arrays: dict, rank: int) -> dict:
    """The global LoRA factors' share of a client of rank `rank`: B's first `rank` columns and A's
    first `rank` rows (other arrays as they are). On FlexLoRA's SVD factors that is the best rank-`rank`
    approximation; under zero padding, the truncation back to the client's rank."""

    def cut(v, index):
        v = v[index]
        return v.contiguous() if hasattr(v, "contiguous") else np.ascontiguousarray(v)

    return {k: cut(v, slice(rank)) if k.endswith(".lora_A") else cut(v, (slice(None), slice(rank)))
            if k.endswith(".lora_B") else v for k, v in arrays.items()}


def padded(arrays: dict, rank: int) -> dict:
    """A client's LoRA factors padded with zeros to rank `rank` (HetLoRA's padding): B A unchanged."""
    out = {}
    for k, v in arrays.items():
        if k.endswith(".lora_A"):
            v = np.concatenate([v, np.zeros((rank - v.shape[0], v.shape[1]), v.dtype)], axis=0)
        elif k.endswith(".lora_B"):
            v = np.concatenate([v, np.zeros((v.shape[0], rank - v.shape[1]), v.dtype)], axis=1)
        out[k] = v
    return out
