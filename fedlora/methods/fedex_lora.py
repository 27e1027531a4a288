"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT's averages, made exact by a residual in the frozen weights.

What a client trains: LoRA's A and B on the frozen weights W, and the head, as under FedIT. How the
server combines: it averages A, B and the head as FedIT does, and folds the residual
R = Σ_k p_k B_k A_k − B̄ Ā (times s = alpha / r) into W, so that the global model W + s B̄ Ā is exactly
the mean of the clients' models.

What travels: up, A, B and the head. Down, by `method.downlink`:
- `global` (default): a sampled client is sent the averages and W of the adapted layers, which the
  residual changes every round: dense, and it also serves a client that missed rounds;
- `broadcast_update`: as in the paper, every client keeps a replica and is sent, after each round, the
  averages and the residual of each adapted layer, which it folds into its own W: dense (m x n a
  layer), or with `method.residual_rank=q` its rank-q truncated SVD, q (m + n) numbers a layer. The
  server folds the same approximation, so the global model is then inexact, and each round's record
  says by how much (`residual_error`: ‖R − R_q‖ / ‖R‖ over the adapted layers; `update_error`: that
  error relative to the exact mean update ‖Σ_k p_k B_k A_k‖).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedlora.aggregate import Update, weighted_mean
from fedlora.errors import ConfigError
from fedlora.methods.base import AdapterMethod, DownlinkConfig, folded_keys, mean_update
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_layers
from fedlora.state import load_arrays


def residual_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """R ≈ U V: the rank-`rank` truncated SVD of R (m x n), U = U_q Σ_q (m x q), V = V_qᵀ (q x n), in float32."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    q = min(rank, s.numel())
    return (u[:, :q] * s[:q]).float(), vh[:q].float()


def residual_keys(name: str, rank: int) -> tuple[str, ...]:
    """The broadcast keys of a layer's residual: dense, or its two factors."""
    return (f"{name}.residual",) if rank == 0 else (f"{name}.residual_U", f"{name}.residual_V")


def residual_of(arrays: Mapping, name: str, rank: int) -> torch.Tensor:
    """A layer's residual (unscaled, m x n) from what the broadcast carries: what the server folds and
    what every replica folds, the same float32 product on either side."""
    parts = [torch.from_numpy(np.asarray(arrays[k].numpy())) for k in residual_keys(name, rank)]
    return parts[0] if rank == 0 else parts[0] @ parts[1]


@register_method("fedex_lora")
class FedExLoRA(AdapterMethod):
    @dataclass
    class Config(DownlinkConfig):
        # 0: the residual travels dense; q > 0: as its rank-q truncated SVD (method.downlink=broadcast_update)
        residual_rank: int = 0

        def validate(self) -> None:
            super().validate()
            if self.residual_rank < 0:
                raise ConfigError(f"method.residual_rank must be >= 0 (0: dense; got {self.residual_rank})")
            if self.residual_rank and self.downlink != "broadcast_update":
                raise ConfigError(f"method.residual_rank={self.residual_rank} sends the residual as a rank-q SVD, and "
                                  "only the broadcast downlink sends the residual (the global downlink sends W): add "
                                  "method.downlink=broadcast_update")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._residuals: dict[str, torch.Tensor] = {}  # the last aggregation's, as broadcast
        self._figures: dict[str, float] = {}

    def global_keys(self, model: nn.Module) -> list[str]:
        """What trains, and the frozen weights W that the residuals change."""
        return folded_keys(model)

    def start_round(self, model: nn.Module, server_round: int) -> None:
        self._residuals, self._figures = {}, {}  # a round without a valid reply folds and sends none

    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        ideal = mean_update(model, updates)  # Σ p_k ΔW_k of each adapted layer
        load_arrays(model, weighted_mean(updates))
        rank = self.config.residual_rank
        lost = whole = exact = 0.0
        with torch.no_grad():
            for name, layer in delta_layers(model):
                residual = (ideal[name] - layer.delta.matrix()).cpu()
                if rank == 0:
                    sent = {f"{name}.residual": residual.float()}
                else:
                    sent = dict(zip(residual_keys(name, rank), residual_factors(residual, rank)))
                    lost += float(torch.linalg.matrix_norm(residual.double() - residual_of(sent, name, rank).double())) ** 2
                    whole += float(torch.linalg.matrix_norm(residual.double())) ** 2
                    exact += float(torch.linalg.matrix_norm(ideal[name].double())) ** 2
                if self.broadcasts:
                    self._residuals |= sent
                layer.fold(layer.scaling * residual_of(sent, name, rank))
        if rank:
            self._figures = {"residual_error": math.sqrt(lost / whole) if whole else 0.0,
                             "update_error": math.sqrt(lost / exact) if exact else 0.0}

    def broadcast(self, model: nn.Module, server_round: int) -> dict[str, torch.Tensor]:
        """The averages, and each layer's residual (dense or its rank-q factors)."""
        return super().broadcast(model, server_round) | self._residuals

    def apply_broadcast(self, model: nn.Module, arrays: Mapping, server_round: int) -> None:
        rank = self.config.residual_rank
        load_arrays(model, {k: v for k, v in arrays.items() if ".residual" not in k})
        with torch.no_grad():
            for name, layer in delta_layers(model):
                if residual_keys(name, rank)[0] in arrays:
                    layer.fold(layer.scaling * residual_of(arrays, name, rank))
        self.start_round(model, server_round + 1)

    def round_figures(self) -> dict[str, float]:
        return dict(self._figures)
