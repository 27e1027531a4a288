"""FedEx-LoRA (Singhal et al., ACL 2025): FedIT's averages, made exact by a residual in the frozen weights.

What a client trains: LoRA's A and B on the frozen weights W, and the head, as under FedIT. How the
server combines: it averages A, B and the head as FedIT does, and folds the residual
s (Σ_k p_k B_k A_k − B̄ Ā) into W, so that the global model W + s B̄ Ā is exactly the mean of the
clients' models. What travels: up, A, B and the head; down, the averages and W of the adapted layers,
which the residual changes every round: dense, counted in the ledger (the paper sends the residual,
dense too; sending W itself also serves a client that missed rounds).
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.aggregate import Update, weighted_mean
from fedlora.methods.base import AdapterMethod, folded_keys, mean_update
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_layers
from fedlora.state import load_arrays


@register_method("fedex_lora")
class FedExLoRA(AdapterMethod):
    def global_keys(self, model: nn.Module) -> list[str]:
        """What trains, and the frozen weights W that the residuals change."""
        return folded_keys(model)

    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        ideal = mean_update(model, updates)  # Σ p_k ΔW_k of each adapted layer
        load_arrays(model, weighted_mean(updates))
        with torch.no_grad():
            for name, layer in delta_layers(model):
                residual = ideal[name] - layer.delta.matrix()
                layer.fold(layer.scaling * residual)
