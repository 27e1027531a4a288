"""Fed-SB (Singhal et al., 2025): federated LoRA-SB, "Initialization using Update Approximation is a
Silver Bullet" (Ponkshe et al.).

What a client trains: LoRA-SB's adapter, ΔW = s B R A, B and A frozen, only the r x r matrix R (and the
head). How the frozen pair is chosen, as LoRA-SB prescribes: before round 1, the gradient G of the
loss with respect to each adapted layer's full weight, summed over `method.init_samples` training
examples (split over a seeded set of `clients_per_round` clients, each summing over its own), gives
the approximation -init_lr · sign(G) of full fine-tuning's first (Adam) step; its truncated SVD
U_r Σ_r V_rᵀ sets B = U_r, A = V_rᵀ and R = Σ_r / s, so the model starts from the best rank-r
approximation of that step. What travels: the gradients once, up, from the init clients (dense,
counted in the ledger's totals and in `summary.json` under `initialisation`); B and A once, down, to
each client the first time it is sampled (it keeps them in its node state); then R and the head
each way, r² numbers a layer up.
How the server combines: it averages R (and the head). s B R_k A is linear in R_k, so the average is
exactly the mean of the clients' updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import MISSING
from torch import nn

from fedlora.aggregate import Update
from fedlora.errors import ConfigError
from fedlora.methods.base import AdapterMethod, MethodConfig, trained_keys
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_key, delta_layers
from fedlora.training import batch_order, pick_device, scores

FRAMES = ("lora_B", "lora_A")


@register_method("fed_sb")
class FedSB(AdapterMethod):
    adapters = ("lora_sb",)
    adapters_because = "trains LoRA-SB's R between a frozen B and A"
    initialises = True

    @dataclass
    class Config(MethodConfig):
        init_samples: int = 170  # training examples whose gradient approximates the first update (LoRA-SB's default)
        init_lr: float = MISSING  # the step of that update, -init_lr · sign(G)

        def validate(self) -> None:
            if self.init_samples < 1:
                raise ConfigError(f"method.init_samples must be >= 1 (got {self.init_samples})")
            if not self.init_lr > 0:
                raise ConfigError(f"method.init_lr must be > 0 (got {self.init_lr})")

    def fixed_keys(self, model: nn.Module) -> list[str]:
        return [delta_key(name, f) for name, _ in delta_layers(model) for f in FRAMES]

    def global_keys(self, model: nn.Module) -> list[str]:
        keys = set(trained_keys(model)) | set(self.fixed_keys(model))
        return [k for k in model.state_dict() if k in keys]

    # --- the initialisation ------------------------------------------------------------------------
    def init_keys(self, model: nn.Module) -> list[str]:
        return [f"{name}.weight" for name, _ in delta_layers(model)]

    def init_update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[dict, int, float]:
        """A client's share of the initialisation: the gradient of its summed loss, at the pretrained
        weights, with respect to each adapted layer's full weight, over its share of init_samples."""
        count = min(len(y), math.ceil(self.config.init_samples / self.cfg.clients_per_round))
        rows = batch_order(len(y), count, 1, seed)[0]
        layers = delta_layers(model)
        device = pick_device()
        model.to(device).train()
        for _, layer in layers:
            layer.weight.requires_grad_(True)
            layer.weight.grad = None
        total = 0.0
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for idx in rows.split(self.cfg.local.batch_size):
                    loss = scores(model, x[idx].to(device), y[idx].to(device))[0]  # summed
                    loss.backward()
                    total += loss.item()
            grads = {f"{name}.weight": layer.weight.grad.detach().cpu().clone() for name, layer in layers}
        finally:
            for p in model.parameters():
                p.grad = None
            for _, layer in layers:
                layer.weight.requires_grad_(False)
        return grads, count, total / count

    def initialise(self, model: nn.Module, updates: list[Update]) -> None:
        """B, R, A of every layer from the truncated SVD of -init_lr · sign(Σ_k G_k)."""
        for name, layer in delta_layers(model):
            g = sum(u.arrays[f"{name}.weight"].astype(np.float64) for u in updates)
            step = -self.config.init_lr * np.sign(g)
            layer.delta.set_from_update(torch.from_numpy(step.reshape(layer.delta.m, layer.delta.n)), layer.scaling)
