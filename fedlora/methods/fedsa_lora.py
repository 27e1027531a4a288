"""FedSA-LoRA (Guo et al., ICLR 2025): selective aggregation, A shared and B personal.

What a client trains: LoRA's A and B and the head. What travels: A and the head, both ways; B never
leaves the client: each client keeps its own B between rounds (in its Flower node state) and starts
from B = 0 the first time it is sampled. How the server combines: it averages A and the head. The
paper's reading: A learns what all clients share, B what is each client's own.

The global model on the server has no trained B of its own (it stays at its initial value), so what
the server evaluates is the pretrained model with the shared A and head; the method is measured by
each client's evaluation of its personalised model (`eval.clients=true`, which it requires and its
preset sets).
"""

from __future__ import annotations

from torch import nn

from fedlora.errors import ConfigError
from fedlora.methods.base import AdapterMethod, trained_keys
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_key, delta_layers


@register_method("fedsa_lora")
class FedSALoRA(AdapterMethod):
    adapters = ("lora", "lora_nonzero")
    adapters_because = "keeps LoRA's B on each client"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if not cfg.eval.clients:
            raise ConfigError("method=fedsa_lora keeps each client's B on the client: only the clients can evaluate the "
                              "models it trains; keep eval.clients=true (its preset's)")

    def personal_keys(self, model: nn.Module) -> list[str]:
        return [delta_key(name, "lora_B") for name, _ in delta_layers(model)]

    def global_keys(self, model: nn.Module) -> list[str]:
        personal = set(self.personal_keys(model))
        return [k for k in trained_keys(model) if k not in personal]

    def up_keys(self, model: nn.Module, server_round: int) -> list[str]:
        return self.global_keys(model)
