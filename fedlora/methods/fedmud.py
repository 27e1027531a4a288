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

from fedlora.errors import ConfigError
from fedlora.methods.base import FactorizedMethod
from fedlora.methods.mud import MUD, MUDConfig
from fedlora.methods.registry import register_method


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
