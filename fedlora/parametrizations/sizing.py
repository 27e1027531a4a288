"""Choosing the ranks or Kronecker grids of a factorized model for a target uplink ratio."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedlora.errors import ConfigError
from fedlora.parametrizations.base import adaptable_layers, matrix_shape
from fedlora.parametrizations.factorizations import KINDS, KronShape


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _balanced_split(n: int) -> tuple[int, int]:
    """n = a * b with a <= b as close as n allows."""
    a = max(d for d in _divisors(n) if d * d <= n)
    return a, n // a


def kron_shapes(m: int, n: int) -> list[KronShape]:
    """Every exact tiling of m x n by a grid of equal blocks, each split into balanced Kronecker
    factors, with fewer parameters than the matrix itself; by parameter count, then most blocks."""
    shapes = []
    for rows in _divisors(m):
        for cols in _divisors(n):
            h1, h2 = _balanced_split(m // rows)
            w1, w2 = _balanced_split(n // cols)
            s = KronShape(rows, cols, h1, h2, w1, w2)
            if s.count < m * n:
                shapes.append(s)
    return sorted(shapes, key=lambda s: (s.count, -s.max_rank, -s.blocks))


def candidates(kind: str, m: int, n: int) -> list[tuple[int | KronShape, int]]:
    """(size, trainable parameters) for every size of `kind` cheaper than the dense m x n matrix, ascending."""
    k = KINDS[kind]
    if k.kronecker:
        return [(s, s.count) for s in kron_shapes(m, n)]
    per_rank = k.per_rank * (m + n)
    return [(r, r * per_rank) for r in range(1, min(m, n) + 1) if r * per_rank < m * n]


HEADER_BYTES = 128  # numpy's .npy header of one array as Flower serializes it (exact bytes are measured)


@dataclass
class Plan:
    kind: str
    sizes: dict[str, int | KronShape]  # factorized layer -> rank or Kronecker grid
    target: float  # uplink bytes relative to the dense model's
    estimate: float  # the same ratio from parameter counts (the run reports the measured one)
    reachable: bool
    note: str = ""


def _tensor_bytes(numel: int) -> int:
    return 4 * numel + HEADER_BYTES


def plan_sizes(model: nn.Module, kind: str, ratio: float, dense_first_last: bool = True) -> Plan:
    """Per-layer ranks or Kronecker grids whose uplink comes closest to `ratio` times the dense
    model's uplink (float32 state entries, BatchNorm statistics included).

    Every factorized layer starts at its smallest size; then the layer with the fewest bytes for its
    size grows one step at a time while the total stays under the target (so each layer gets about the
    same fraction of its weight); one more step is taken when that lands nearer the target."""
    k = KINDS[kind]
    layers = adaptable_layers(model)
    chosen = layers[1:-1] if dense_first_last else layers
    if not chosen:
        kept = " (the first and the last are kept dense: method.dense_first_last=false adapts them too)"
        raise ConfigError("the model has no Conv2d or Linear layer to factorize" + (kept if dense_first_last else ""))
    state = model.state_dict()
    dense_total = sum(_tensor_bytes(v.numel()) for v in state.values() if v.is_floating_point())
    fixed = dense_total - sum(_tensor_bytes(m.weight.numel()) for _, m in chosen)
    target = ratio * dense_total
    cands, sizes_n = {}, {}
    for name, m in chosen:
        rows, cols = matrix_shape(m.weight.shape)
        cands[name] = [(s, _tensor_bytes(0) * k.tensors + 4 * c) for s, c in candidates(kind, rows, cols)]
        if not cands[name]:
            raise ConfigError(f"layer {name} ({rows}x{cols}) has no {kind} factorization with fewer parameters "
                              "than the layer itself; keep it dense")
        sizes_n[name] = rows * cols
    idx = {name: 0 for name in cands}

    def total() -> float:
        return fixed + sum(cands[n][i][1] for n, i in idx.items())

    while True:
        growable = [n for n in cands if idx[n] + 1 < len(cands[n])
                    and total() - cands[n][idx[n]][1] + cands[n][idx[n] + 1][1] <= target]
        if not growable:
            break
        name = min(growable, key=lambda n: cands[n][idx[n]][1] / sizes_n[n])
        idx[name] += 1
    steps = [n for n in cands if idx[n] + 1 < len(cands[n])]
    if steps:
        name = min(steps, key=lambda n: cands[n][idx[n] + 1][1] - cands[n][idx[n]][1])
        over = total() - cands[name][idx[name]][1] + cands[name][idx[name] + 1][1] - target
        if over < target - total():
            idx[name] += 1
    estimate = total() / dense_total
    reachable = abs(estimate - ratio) <= 0.05 * ratio
    note = ""
    if not reachable:
        floor = (fixed + sum(c[0][1] for c in cands.values())) / dense_total
        if floor > ratio * 1.05:
            note = (f"ratio {ratio:g} is out of reach: the layers kept dense (the first and last, BatchNorm, "
                    f"biases) with the smallest factorization of the others already send {floor:.4f} of the dense "
                    "model's bytes")
        else:
            note = f"the nearest ratio that the sizes found allow is {estimate:.4f}"
    return Plan(kind, {n: cands[n][i][0] for n, i in idx.items()}, ratio, estimate, reachable, note)
