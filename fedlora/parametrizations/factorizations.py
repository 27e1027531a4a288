"""Low-rank parametrizations of a layer's update (FedMUD) or of its weight (FedLMT, FedPara).

Each is a `Delta` (`base.py`): trainable factors are parameters, frozen ones buffers drawn from a seed.

- `LowRank`: L R, L (m x r) random, R (r x n) zero, both trained (FedMUD's low-rank update).
- `AggregationAwareLowRank`: L1 R1 + L2 R2 with L1, R2 frozen random and R1, L2 trained from zero:
  linear in what is trained, so averaging the trained factors averages the updates exactly.
- `Kronecker`: a grid of equal blocks, each A_o ⊗ B_o (BKD); `AggregationAwareKronecker`: each block
  A1_o ⊗ B1_o + A2_o ⊗ B2_o with A1, B2 frozen.
- `LowRankWeight`: the weight itself is U V, trained from scratch (FedLMT).
- `HadamardLowRank`: the weight is (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ) (FedPara).

`KINDS` names them for the methods and for sizing (`sizing.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fedlora.parametrizations.base import Delta, DeltaLayer, adaptable_layers, inject, matrix_shape
from fedlora.seeds import cpu_generator, uniform


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


class LowRank(Delta):
    factored = True  # applies its factors to x without forming ΔW

    def __init__(self, m: int, n: int, rank: int, magnitude: float):
        super().__init__(m, n)
        self.rank, self.magnitude = rank, magnitude
        self._factor("L", (m, rank), True)
        self._factor("R", (rank, n), True)

    def reset(self, seed: int) -> None:
        self._set("L", uniform(self.L.shape, self.magnitude, cpu_generator(seed)))
        self._set("R", torch.zeros_like(self.R))

    def matrix(self) -> torch.Tensor:
        return self.L @ self.R

    def forward(self, x: torch.Tensor, scaling: float) -> torch.Tensor:
        return (x @ self.R.T @ self.L.T) * scaling  # two thin matmuls, as LoRA's


class AggregationAwareLowRank(Delta):
    factored = True  # applies its factors to x without forming ΔW

    def __init__(self, m: int, n: int, rank: int, magnitude: float):
        super().__init__(m, n)
        self.rank, self.magnitude = rank, magnitude
        self._factor("L1", (m, rank), False)
        self._factor("R1", (rank, n), True)
        self._factor("L2", (m, rank), True)
        self._factor("R2", (rank, n), False)

    def reset(self, seed: int) -> None:
        gen = cpu_generator(seed)
        self._set("L1", uniform(self.L1.shape, self.magnitude, gen))
        self._set("R2", uniform(self.R2.shape, self.magnitude, gen))
        self._set("R1", torch.zeros_like(self.R1))
        self._set("L2", torch.zeros_like(self.L2))

    def matrix(self) -> torch.Tensor:
        return self.L1 @ self.R1 + self.L2 @ self.R2

    def forward(self, x: torch.Tensor, scaling: float) -> torch.Tensor:
        return (x @ self.R1.T @ self.L1.T + x @ self.R2.T @ self.L2.T) * scaling


@dataclass(frozen=True)
class KronShape:
    """A grid of rows x cols equal blocks tiling an m x n matrix exactly; each block, (h1*h2) x (w1*w2),
    is A ⊗ B with A (h1 x w1) and B (h2 x w2)."""

    rows: int
    cols: int
    h1: int
    h2: int
    w1: int
    w2: int

    @property
    def blocks(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols} blocks of ({self.h1}x{self.w1})⊗({self.h2}x{self.w2})"

    @property
    def count(self) -> int:  # parameters of one Kronecker term over all blocks
        return self.blocks * (self.h1 * self.w1 + self.h2 * self.w2)

    @property
    def max_rank(self) -> int:
        block = min(self.h1, self.w1) * min(self.h2, self.w2)
        return min(self.rows * self.h1 * self.h2, self.cols * self.w1 * self.w2, block * self.blocks)


def _kron_blocks(a: torch.Tensor, b: torch.Tensor, shape: KronShape) -> torch.Tensor:
    """Blocks kron(a[o], b[o]) laid out on the grid: the (rows*h1*h2) x (cols*w1*w2) matrix.

    Block o = (r, c) of the grid holds a[o][i, j] * b[o][k, l] at row (r, i, k), column (c, j, l): one
    broadcast product written straight into that layout (no intermediate of the matrix's size to
    permute, which cost 1.6x the time for a 512 x 4608 VGG kernel)."""
    s = shape
    a = a.view(s.rows, s.cols, s.h1, s.w1).permute(0, 2, 1, 3)[:, :, None, :, :, None]  # r, i, ., c, j, .
    b = b.view(s.rows, s.cols, s.h2, s.w2).permute(0, 2, 1, 3)[:, None, :, :, None, :]  # r, ., k, c, ., l
    return (a * b).reshape(s.rows * s.h1 * s.h2, s.cols * s.w1 * s.w2)


class Kronecker(Delta):
    def __init__(self, m: int, n: int, shape: KronShape, magnitude: float):
        super().__init__(m, n)
        self.shape, self.magnitude = shape, magnitude
        self._factor("A", (shape.blocks, shape.h1, shape.w1), True)
        self._factor("B", (shape.blocks, shape.h2, shape.w2), True)

    def reset(self, seed: int) -> None:
        self._set("A", uniform(self.A.shape, self.magnitude, cpu_generator(seed)))
        self._set("B", torch.zeros_like(self.B))

    def matrix(self) -> torch.Tensor:
        return _kron_blocks(self.A, self.B, self.shape)


class AggregationAwareKronecker(Delta):
    def __init__(self, m: int, n: int, shape: KronShape, magnitude: float):
        super().__init__(m, n)
        self.shape, self.magnitude = shape, magnitude
        g = shape.blocks
        self._factor("A1", (g, shape.h1, shape.w1), False)
        self._factor("B1", (g, shape.h2, shape.w2), True)
        self._factor("A2", (g, shape.h1, shape.w1), True)
        self._factor("B2", (g, shape.h2, shape.w2), False)

    def reset(self, seed: int) -> None:
        gen = cpu_generator(seed)
        self._set("A1", uniform(self.A1.shape, self.magnitude, gen))
        self._set("B2", uniform(self.B2.shape, self.magnitude, gen))
        self._set("B1", torch.zeros_like(self.B1))
        self._set("A2", torch.zeros_like(self.A2))

    def matrix(self) -> torch.Tensor:
        return _kron_blocks(self.A1, self.B1, self.shape) + _kron_blocks(self.A2, self.B2, self.shape)


class LowRankWeight(Delta):
    """FedLMT: W = U V. Drawn so that W's entries have the variance `weight_var` of the dense layer's
    own initialisation: Var(UV) = r Var(U) Var(V)."""

    def __init__(self, m: int, n: int, rank: int, weight_var: float):
        super().__init__(m, n)
        self.rank, self.weight_var = rank, weight_var
        self._factor("U", (m, rank), True)
        self._factor("V", (rank, n), True)

    def reset(self, seed: int) -> None:
        gen = cpu_generator(seed)
        std = (self.weight_var / self.rank) ** 0.25
        self._set("U", _normal(self.U.shape, std, gen))
        self._set("V", _normal(self.V.shape, std, gen))

    def matrix(self) -> torch.Tensor:
        return self.U @ self.V


class HadamardLowRank(Delta):
    """FedPara: W = (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ), rank up to r². Var(W) = (r σ⁴)², matched to `weight_var`."""

    def __init__(self, m: int, n: int, rank: int, weight_var: float):
        super().__init__(m, n)
        self.rank, self.weight_var = rank, weight_var
        for name, rows in (("X1", m), ("Y1", n), ("X2", m), ("Y2", n)):
            self._factor(name, (rows, rank), True)

    def reset(self, seed: int) -> None:
        gen = cpu_generator(seed)
        std = (math.sqrt(self.weight_var) / self.rank) ** 0.25
        for name in ("X1", "Y1", "X2", "Y2"):
            self._set(name, _normal(getattr(self, name).shape, std, gen))

    def matrix(self) -> torch.Tensor:
        return (self.X1 @ self.Y1.T) * (self.X2 @ self.Y2.T)


@dataclass(frozen=True)
class FactorizationKind:
    build: Callable[..., Delta]  # (m, n, size, scale) -> Delta
    replaces_weight: bool  # the weight itself is factorized (FedLMT, FedPara), not its update
    tensors: int  # trainable tensors per layer (each costs a header on the wire)
    kronecker: bool = False  # sized by a KronShape, not a rank
    per_rank: int = 1  # trainable parameters per unit of rank, in units of m + n


KINDS = {
    "lowrank": FactorizationKind(LowRank, False, 2),
    "aad_lowrank": FactorizationKind(AggregationAwareLowRank, False, 2),
    "kronecker": FactorizationKind(Kronecker, False, 2, kronecker=True),
    "aad_kronecker": FactorizationKind(AggregationAwareKronecker, False, 2, kronecker=True),
    "lowrank_weight": FactorizationKind(LowRankWeight, True, 2),
    "hadamard": FactorizationKind(HadamardLowRank, True, 4, per_rank=2),
}


def _init_var(base: nn.Conv2d | nn.Linear) -> float:
    # PyTorch's default init of Conv2d and Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return 1.0 / (3.0 * base.weight[0].numel())


def factorize(model: nn.Module, kind: str, sizes: dict[str, int | KronShape], magnitude: float) -> nn.Module:
    """Replace the layers named in `sizes` (rank or Kronecker grid each) by factorized DeltaLayers, in
    place; biases stay dense and trainable. The factors are drawn by `reset_deltas`."""
    k = KINDS[kind]

    def make(name: str, base: nn.Module) -> DeltaLayer:
        m, n = matrix_shape(base.weight.shape)
        scale = _init_var(base) if k.replaces_weight else magnitude
        return DeltaLayer(base, k.build(m, n, sizes[name], scale), replace_weight=k.replaces_weight, train_bias=True)

    inject(model, [(name, layer) for name, layer in adaptable_layers(model) if name in sizes], make)
    return model
