"""FLoRA (Wang et al., NeurIPS 2024): stacking the clients' LoRA factors.

What a client trains: a fresh LoRA adapter every round (drawn from a round seed: A random, B zero under
`adapter=lora`) on the frozen weights W, and the head. What travels: up, the adapter's A_k and B_k and
the head; down, W of the adapted layers as it stands (it changes every round) and the head, not the
adapter, which every process draws itself. How the server combines: it stacks B = [p_1 s B_1 ... p_K s B_K]
and A = [A_1; ...; A_K] (p_k the clients' shares of the examples, s = alpha / r), so that
B A = Σ_k p_k s B_k A_k, the mean of the clients' updates, exactly and whatever each client's rank
(`adapter.ranks`: every client scales by alpha / adapter.r); it
folds that (less the adapter every client started from, zero under zero initialisation) into W; the
head is averaged.

The paper sends the stacked factors to every client, which folds them into its own W; here a sampled
client is sent W itself (`fedmud.MUD`'s global downlink), which also serves a client that missed
rounds: dense, counted in the ledger, and the price of FLoRA's exactness for a model this size.
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.aggregate import Update, stacked_factors, weights
from fedlora.errors import ConfigError
from fedlora.methods.base import AdapterMethod, mean_besides
from fedlora.methods.fedmud import MUD
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_key, delta_layers
from fedlora.state import load_arrays


@register_method("flora")
class FLoRA(MUD, AdapterMethod):
    adapters = ("lora", "lora_nonzero")
    adapters_because = "stacks LoRA's factors B and A"
    interval = 1  # a fresh adapter every round
    broadcasts = False
    heterogeneous = True  # the stacking takes any rank

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.adapter is not None and cfg.adapter.get("ranks") and cfg.adapter.get("init") != "zero":
            raise ConfigError("method=flora with adapter.ranks needs adapter=lora (B = 0): a client's fresh adapter of "
                              "its own rank must add nothing to the global model")

    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        new = mean_besides(model, updates, ("lora_A", "lora_B"))  # the head
        shares = weights(updates)
        for name, layer in delta_layers(model):
            b, a = stacked_factors([u.arrays[delta_key(name, "lora_B")] for u in updates],
                                   [u.arrays[delta_key(name, "lora_A")] for u in updates],
                                   [share * layer.scaling for share in shares])
            with torch.no_grad():
                started = layer.scaled_delta().reshape(b.shape[0], a.shape[1]).double().cpu()
            layer.fold(torch.from_numpy(b @ a) - started)
        load_arrays(model, new)
