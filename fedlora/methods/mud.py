"""Model Update Decomposition (FedMUD, ICML 2025), the round protocol alone: every `interval` rounds
the update is folded into the frozen weights W and the factors are redrawn from a round seed, so each
round's ΔW starts at its fresh value (zero, where one factor is drawn zero). Shared by FedMUD's methods
(`fedmud`), FLoRA (a fresh adapter every round) and MUD on adapters (`aad_lora_mud`).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING
from torch import nn

from fedlora.errors import ConfigError
from fedlora.methods.base import DownlinkConfig, folded_keys
from fedlora.parametrizations.base import delta_key, delta_layers, reset_deltas
from fedlora.seeds import derive_seed


@dataclass
class MUDConfig(DownlinkConfig):
    """`interval`, and the downlink: under broadcast_update every client receives each round's
    aggregated factors and folds and redraws its own replica."""

    interval: int = MISSING  # fold ΔW into W and redraw the factors every `interval` rounds

    def validate(self) -> None:
        super().validate()
        if self.interval < 1:
            raise ConfigError(f"method.interval must be >= 1 (got {self.interval})")


class MUD:
    """Model Update Decomposition's round protocol, for a Method whose config is a MUDConfig: every
    `interval` rounds the delta is folded into the frozen weights W and redrawn from a round seed. W
    then belongs to the global state and travels down (or, with `downlink: broadcast_update`, every
    client keeps a replica and is sent each round's update)."""

    @property
    def interval(self) -> int:
        """Rounds between folds."""
        return self.config.interval

    def redraws(self, server_round: int) -> bool:
        """Whether the update is folded into W and the factors redrawn as this round starts."""
        return server_round >= 1 and (server_round - 1) % self.interval == 0

    def factor_seed(self, server_round: int) -> int:
        last_redraw = server_round - (server_round - 1) % self.interval if server_round >= 1 else 0
        return derive_seed(self.cfg.seed, "factors", last_redraw)

    def regenerate(self, model: nn.Module, server_round: int) -> None:
        # every factor: the frozen ones, and the trained ones that the round's arrays then overwrite
        # (or, in a round that redraws, that start at their fresh values)
        reset_deltas(model, self.factor_seed(server_round))

    def start_round(self, model: nn.Module, server_round: int) -> None:
        if self.redraws(server_round):
            for _, layer in delta_layers(model):
                layer.fold()
            self.regenerate(model, server_round)

    def global_keys(self, model: nn.Module) -> list[str]:
        """What trains, and the frozen weights W that the folds change."""
        return folded_keys(model)

    def down_keys(self, model: nn.Module, server_round: int) -> list[str]:
        if self.broadcasts:
            return []
        if not self.redraws(server_round):
            return self.global_keys(model)
        redrawn = {delta_key(name, p) for name, layer in delta_layers(model) for p, _ in layer.delta.named_parameters()}
        return [k for k in self.global_keys(model) if k not in redrawn]
