"""FedMUD (ICML 2025): Model Update Decomposition, with Block-wise Kronecker Decomposition and
Aggregation-Aware Decomposition.

What a client trains: each adapted layer's weight is W + ΔW, W frozen, ΔW factorized
(`parametrizations.factorizations`). At the start of every `interval`-th round the update is folded
into W and the factors are redrawn from a round seed, so ΔW = 0 when local training starts. Frozen
factors never travel: every process draws them from that seed.

What travels: down, the global weights W (and the layers kept dense), not the factors a client can
redraw itself (all of them in a round that redraws); up, the factors it trained, the dense layers and
the BatchNorm statistics, never W. With `downlink: broadcast_update`, every client instead keeps a
replica of the global model and is sent each round's aggregated update after the round.

How the server combines: the factors are averaged like any weight. That averages the clients' ΔW
exactly when ΔW is linear in what trains (AAD: L1 R1 + L2 R2 with L1, R2 frozen); otherwise (L R, or
A ⊗ B, both trained) it is the paper's inexact baseline.

The four variants are the four factorizations: `fedmud` (MUD, L R), `fedmud_bkd` (Kronecker blocks),
`fedmud_aad` (two-term L R), `fedmud_bkd_aad` (two-term Kronecker blocks: the full method).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING
from torch import nn

from fedlora.errors import ConfigError
from fedlora.methods.base import FactorizedMethod, MethodConfig, folded_keys
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_key, delta_layers, reset_deltas
from fedlora.seeds import derive_seed

DOWNLINKS = ("global", "broadcast_update")


@dataclass
class MUDConfig(MethodConfig):
    interval: int = MISSING  # fold ΔW into W and redraw the factors every `interval` rounds
    # global: sampled clients receive the global weights; broadcast_update: every client receives
    # each round's aggregated update and keeps its own replica
    downlink: str = "global"

    def validate(self) -> None:
        super().validate()
        if self.interval < 1:
            raise ConfigError(f"method.interval must be >= 1 (got {self.interval})")
        if self.downlink not in DOWNLINKS:
            raise ConfigError(f"method.downlink must be global or broadcast_update (got {self.downlink})")


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

    @property
    def broadcasts(self) -> bool:
        return self.config.downlink == "broadcast_update"

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


@register_method("fedmud")
class FedMUD(MUD, FactorizedMethod):
    """MUD alone: ΔW = L R, L ~ U(-a, a) and R = 0, both trained (inexact)."""

    factorization = "lowrank"

    @dataclass
    class Config(MUDConfig, FactorizedMethod.Config):
        init_magnitude: float = MISSING  # the random factors are drawn from U(-a, a)

        def validate(self) -> None:
            super().validate()
            if not self.init_magnitude > 0:
                raise ConfigError(f"method.init_magnitude must be > 0 (got {self.init_magnitude})")

    @property
    def magnitude(self) -> float:
        return self.config.init_magnitude


@register_method("fedmud_bkd")
class FedMUDBKD(FedMUD):
    """MUD + BKD: ΔW is a grid of Kronecker blocks A ⊗ B, A random, B zero, both trained (inexact)."""

    factorization = "kronecker"


@register_method("fedmud_aad")
class FedMUDAAD(FedMUD):
    """MUD + AAD: ΔW = L1 R1 + L2 R2, L1 and R2 frozen, R1 and L2 trained from zero (exact)."""

    factorization = "aad_lowrank"


@register_method("fedmud_bkd_aad")
class FedMUDBKDAAD(FedMUD):
    """The full FedMUD: each block A1 ⊗ B1 + A2 ⊗ B2, A1 and B2 frozen (exact, at the rank of Kronecker blocks)."""

    factorization = "aad_kronecker"
