"""FLoRA (Wang et al., NeurIPS 2024): stacking the clients' LoRA factors.

What a client trains: a fresh LoRA adapter every round (drawn from a round seed: A random, B zero under
`adapter=lora`) on the frozen weights W, and the head. What travels: up, the adapter's A_k and B_k and
the head; down (below), never the fresh adapter, which every process draws itself. How the server combines: it stacks B = [p_1 s B_1 ... p_K s B_K]
and A = [A_1; ...; A_K] (p_k the clients' shares of the examples, s = alpha / r), so that
B A = Σ_k p_k s B_k A_k, the mean of the clients' updates, exactly and whatever each client's rank
(`adapter.ranks`: every client scales by alpha / adapter.r); it
folds that (less the adapter every client started from, zero under zero initialisation) into W; the
head is averaged.

Down, by `method.downlink`: `global` (default) sends a sampled client W itself as it stands (it changes
every round), which also serves a client that missed rounds: dense, counted in the ledger, and the price
of FLoRA's exactness for a model this size. `broadcast_update` is the paper's mechanism: every client
keeps a replica and is sent, after each round, the head and the stacked factors, Σ r_k (m + n) numbers
a layer for the K clients of the round, which it folds into its own W.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedlora.aggregate import Update, stacked_factors, weights
from fedlora.errors import ConfigError
from fedlora.methods.base import AdapterMethod, DownlinkConfig, mean_besides
from fedlora.methods.mud import MUD
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_key, delta_layers
from fedlora.state import load_arrays


@register_method("flora")
class FLoRA(MUD, AdapterMethod):
    Config = DownlinkConfig
    adapters = ("lora", "lora_nonzero")
    adapters_because = "stacks LoRA's factors B and A"
    interval = 1  # a fresh adapter every round
    heterogeneous = True  # the stacking takes any rank

    def __init__(self, cfg):
        super().__init__(cfg)
        self._stacked: dict[str, torch.Tensor] = {}  # the last aggregation's factors, as broadcast

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.adapter is not None and cfg.adapter.get("ranks") and cfg.adapter.get("init") != "zero":
            raise ConfigError("method=flora with adapter.ranks needs adapter=lora (B = 0): a client's fresh adapter of "
                              "its own rank must add nothing to the global model")

    def start_round(self, model: nn.Module, server_round: int) -> None:
        self._stacked = {}  # a round without a valid reply folds and sends none
        super().start_round(model, server_round)

    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        new = mean_besides(model, updates, ("lora_A", "lora_B"))  # the head
        shares = weights(updates)
        for name, layer in delta_layers(model):
            b, a = stacked_factors([u.arrays[delta_key(name, "lora_B")] for u in updates],
                                   [u.arrays[delta_key(name, "lora_A")] for u in updates],
                                   [share * layer.scaling for share in shares])
            stacked = {f"{name}.stacked_B": torch.from_numpy(b).float(), f"{name}.stacked_A": torch.from_numpy(a).float()}
            if self.broadcasts:
                self._stacked |= stacked
            self._fold(layer, name, stacked)
        load_arrays(model, new)

    @staticmethod
    def _fold(layer, name: str, stacked: Mapping) -> None:
        """W += B A − (the adapter every client started the round from), from the stacked factors as
        they travel (float32), on the server and on every replica alike."""
        b, a = (torch.from_numpy(np.asarray(stacked[f"{name}.stacked_{f}"].numpy())).double() for f in "BA")
        with torch.no_grad():
            started = layer.scaled_delta().reshape(b.shape[0], a.shape[1]).double().cpu()
        layer.fold(b @ a - started)

    def broadcast(self, model: nn.Module, server_round: int) -> dict[str, torch.Tensor]:
        """The head, and each layer's stacked factors (the clients' own A and B are redrawn, not sent)."""
        factors = {delta_key(name, f) for name, _ in delta_layers(model) for f in ("lora_A", "lora_B")}
        return {k: v for k, v in super().broadcast(model, server_round).items() if k not in factors} | self._stacked

    def apply_broadcast(self, model: nn.Module, arrays: Mapping, server_round: int) -> None:
        for name, layer in delta_layers(model):
            if f"{name}.stacked_B" in arrays:
                self._fold(layer, name, arrays)
        load_arrays(model, {k: v for k, v in arrays.items() if ".stacked_" not in k})
        self.start_round(model, server_round + 1)
