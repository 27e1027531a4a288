"""Pure helpers for combining the clients' replies: no model, no Flower."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Update:
    """One client's reply as the server combines it: the arrays it sent and the examples it trained on."""

    arrays: dict[str, np.ndarray]
    num_examples: int


def weights(updates: Sequence[Update]) -> list[float]:
    """Each update's share of the examples."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def weighted_mean(updates: Sequence[Update], keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The example-weighted mean of each array, summed in float64 in the order given (the server gives
    partition order, so the result does not depend on the order in which replies arrive)."""
    shares = weights(updates)
    out = {}
    for key in keys if keys is not None else updates[0].arrays:
        first = updates[0].arrays[key]
        acc = np.zeros(first.shape, np.float64)
        for u, share in zip(updates, shares):
            acc += u.arrays[key].astype(np.float64) * share
        out[key] = acc.astype(first.dtype)
    return out


def truncated_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """B (m x r) and A (r x n) with B A the best rank-r approximation of `matrix` (Eckart-Young):
    U_r Σ_r V_rᵀ of its SVD, with √Σ_r on each side so that B and A have the same scale."""
    u, s, vh = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def stacked_factors(bs: Sequence[np.ndarray], as_: Sequence[np.ndarray],
                    coefficients: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA's stacking: B = [c_1 B_1 ... c_K B_K] (m x Σ r_k) and A = [A_1; ...; A_K] (Σ r_k x n), so
    that B A = Σ_k c_k B_k A_k exactly, whatever each client's rank r_k."""
    b = np.concatenate([np.asarray(b_k, np.float64) * c for b_k, c in zip(bs, coefficients)], axis=1)
    a = np.concatenate([np.asarray(a_k, np.float64) for a_k in as_], axis=0)
    return b, a
