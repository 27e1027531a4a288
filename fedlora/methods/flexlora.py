"""FlexLoRA (Bai et al., NeurIPS 2024): the server forms the full-size update Σ_k p_k s B_k A_k of
each adapted layer from the clients' LoRA factors (p_k their shares of the examples, s = alpha / r),
takes its SVD, and sends every client the rank-r truncation as new factors: the global update is exact
up to the truncation, which is the best rank-r approximation of the mean of the clients' updates.

The head (and anything else that trains besides the adapters) is averaged as in FedAvg. The update
must be a product B A, so the adapter is LoRA (zero or non-zero initialisation), not BoRA.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from fedlora.aggregate import Update, truncated_factors, weighted_mean, weights
from fedlora.errors import ConfigError
from fedlora.methods.base import AdapterMethod
from fedlora.methods.registry import register_method
from fedlora.parametrizations.adapters import LoRA
from fedlora.parametrizations.base import delta_layers
from fedlora.state import load_arrays


@register_method("flexlora")
class FlexLoRA(AdapterMethod):
    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        if cfg.adapter is not None and cfg.adapter.name not in ("lora", "lora_nonzero"):
            raise ConfigError(f"method=flexlora splits the SVD of Σ p_k B_k A_k back into LoRA factors B and A; "
                              f"adapter={cfg.adapter.name} is not a product B A: use adapter=lora or lora_nonzero")

    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        layers = [(name, layer) for name, layer in delta_layers(model) if isinstance(layer.delta, LoRA)]
        factors = {f"{name}.delta.{f}" for name, _ in layers for f in ("lora_A", "lora_B")}
        full: dict[str, np.ndarray] = {}  # Σ p_k s B_k A_k of each adapted layer, in float64
        with torch.no_grad():
            for update, share in zip(updates, weights(updates)):
                load_arrays(model, update.arrays)
                for name, layer in layers:
                    full[name] = full.get(name, 0) + share * layer.scaled_delta().double().cpu().numpy()
        rest = [k for k in updates[0].arrays if k not in factors]
        new = weighted_mean(updates, rest)
        for name, layer in layers:
            b, a = truncated_factors(full[name] / layer.scaling, layer.delta.r)
            for key, value in ((f"{name}.delta.lora_B", b), (f"{name}.delta.lora_A", a)):
                new[key] = value.astype(updates[0].arrays[key].dtype)
        load_arrays(model, new)
