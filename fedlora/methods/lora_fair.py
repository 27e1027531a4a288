"""LoRA-FAIR (Bian et al., ICCV 2025): FedIT's averages of A and B, with B̄ corrected on the server.

The server averages A and B as FedIT does, then looks for the ΔB that minimises
1 - cos((B̄ + ΔB) Ā, Σ p_k B_k A_k) + λ ||ΔB||², a few steps of Adam from ΔB = 0, so that the update
the clients start the next round from points along the ideal one. Closer in direction, not exact; the
same communication as FedIT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from fedlora.aggregate import Update, weighted_mean
from fedlora.errors import ConfigError
from fedlora.methods.base import AdapterMethod, MethodConfig, mean_update
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import Delta, delta_key, delta_layers
from fedlora.state import load_arrays


def fair_refine(delta: Delta, ideal: torch.Tensor, lam: float, steps: int, lr: float) -> torch.Tensor:
    """With `delta` holding the averaged factors (Ā, B̄), the B̄ + ΔB that minimises
    1 - cos((B̄ + ΔB) Ā, ideal) + lam ||ΔB||², by `steps` of Adam from ΔB = 0."""
    b_avg = delta.lora_B.detach()
    change = torch.zeros_like(b_avg, requires_grad=True)
    opt = torch.optim.Adam([change], lr=lr)
    target = ideal.detach().flatten()
    for _ in range(steps):
        opt.zero_grad()
        product = delta.matrix(b_avg + change).flatten()
        loss = 1 - F.cosine_similarity(product, target, dim=0) + lam * change.pow(2).sum()
        loss.backward()
        opt.step()
    return (b_avg + change).detach()


@register_method("lora_fair")
class LoRAFAIR(AdapterMethod):
    adapters = ("lora", "lora_nonzero", "bora")
    adapters_because = "corrects the adapter's B"

    @dataclass
    class Config(MethodConfig):
        fair_lambda: float = MISSING  # weight of ||ΔB||² in the refinement of B
        fair_steps: int = MISSING  # optimiser steps of the refinement
        fair_lr: float = MISSING  # its learning rate (Adam)

        def validate(self) -> None:
            if not (self.fair_lambda >= 0 and self.fair_steps >= 1 and self.fair_lr > 0):
                raise ConfigError("lora_fair needs method.fair_lambda >= 0, method.fair_steps >= 1 and "
                                  "method.fair_lr > 0")

    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        averaged = weighted_mean(updates)
        ideal = mean_update(model, updates)  # Σ p_k B_k A_k of each adapted layer
        load_arrays(model, averaged)
        c = self.config
        for name, layer in delta_layers(model):
            key = delta_key(name, "lora_B")
            refined = fair_refine(layer.delta, ideal[name], c.fair_lambda, c.fair_steps, c.fair_lr)
            averaged[key] = refined.cpu().numpy().astype(averaged[key].dtype)
        load_arrays(model, averaged)
