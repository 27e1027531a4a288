"""RoLoRA (Chen et al., 2025, alternating optimisation of LoRA in federated fine-tuning).

What a client trains: in a round of the B phase, LoRA's B (and the head) with A frozen; in a round of
the A phase, A (and the head) with B frozen; the phases alternate, B first by default
(`method.first`). What travels: down, the whole adapter and the head, as under FedIT; up, only the
factor that trained and the head, half of FedIT's adapter bytes. How the server combines: it averages
what came up. The factor that stayed frozen is the same on every client, so the average of B_k A (or
of B A_k) is exactly the mean of the clients' updates, every round.

B first, where the issue that asked for RoLoRA put A first: with LoRA's zero initialisation B = 0, so
A's gradient s Bᵀ G is zero and a first round of A would train nothing but the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fedlora.errors import ConfigError
from fedlora.methods.base import AdapterMethod, MethodConfig, trained_keys
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_key, delta_layers

FACTORS = {"A": "lora_A", "B": "lora_B"}


@register_method("rolora")
class RoLoRA(AdapterMethod):
    adapters = ("lora", "lora_nonzero")
    adapters_because = "alternates between LoRA's factors A and B"

    @dataclass
    class Config(MethodConfig):
        first: str = "B"  # the factor that trains in round 1 (A or B); the other in round 2, and so on

        def validate(self) -> None:
            if self.first not in FACTORS:
                raise ConfigError(f"method.first must be A or B (got {self.first})")

    def frozen(self, server_round: int) -> str:
        """The factor (lora_A or lora_B) that stays frozen in `server_round`."""
        other = "B" if self.config.first == "A" else "A"
        return FACTORS[other if server_round % 2 == 1 else self.config.first]

    def _factor_keys(self, model: nn.Module, factor: str) -> set[str]:
        return {delta_key(name, factor) for name, _ in delta_layers(model)}

    def global_keys(self, model: nn.Module) -> list[str]:
        """Both factors and the head, whichever trains this round."""
        keys = set(trained_keys(model)) | {k for f in FACTORS.values() for k in self._factor_keys(model, f)}
        return [k for k in model.state_dict() if k in keys]

    def up_keys(self, model: nn.Module, server_round: int) -> list[str]:
        frozen = self._factor_keys(model, self.frozen(server_round))
        return [k for k in self.global_keys(model) if k not in frozen]

    def set_trainable(self, model: nn.Module, server_round: int) -> None:
        frozen = self.frozen(server_round)
        for _, layer in delta_layers(model):
            for factor in FACTORS.values():
                getattr(layer.delta, factor).requires_grad_(factor != frozen)
