"""Central differential privacy with server-side fixed clipping (DP-FedAvg: McMahan et al., 2018;
Andrew et al., 2021), as a wrapper around the strategy, in the shape of Flower's
`DifferentialPrivacyServerSideFixedClipping`, with its helper for the noise's scale.

Each valid reply's update (what it sent minus what the round started from, over every array that
travels up) is clipped to norm C; the clipped updates are summed with equal weights and divided by
n = clients_per_round, the number of clients sampled (the mean when all of them replied; the
accounting holds for this uniform, fixed-denominator average only: with example weights one client's
share, and so its sensitivity, could be larger than 1/n, and with the number of replies as divisor it
would depend on who replied); Gaussian noise of standard deviation σ C / n is added. What the server
does with the noised average afterwards (FedMUD's fold, the broadcast, clamping BatchNorm's running
variances at 0) is post-processing and costs no privacy.

Why not Flower's class itself: it pairs a reply's arrays with the global model's by position (here a
reply carries what the method sends up, a part of the global state), noises everything its inner
strategy returns (here the global state, the frozen weights of FedMUD or FLoRA too), draws its noise
from NumPy's global generator (here it is drawn from the run seed and the round, so that a resumed
run is the run never stopped), and gives up a round when fewer replies came than were sampled; and
its clipping divides by the update's norm, which is 0 for a client that sent back what it received.

Privacy is counted per round released, as Flower's fixed-clipping accountant counts it: a Gaussian
mechanism with noise multiplier σ and no amplification by the sampling of clients (each round's
clients are drawn without replacement, a fixed number), at the level of a client (all its data).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import compute_stdv

from fedlora.seeds import cpu_generator, derive_seed
from strategies.strategy import MethodStrategy

log = logging.getLogger("fedlora")


class ServerSideFixedClipping:
    """`strategy` with each accepted update clipped to `clipping_norm`, the replies averaged
    uniformly and the average noised (σ = `noise_multiplier`); everything else is the strategy's."""

    def __init__(self, strategy: MethodStrategy, noise_multiplier: float, clipping_norm: float, seed: int):
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ValueError(f"noise multiplier must be >= 0 and clipping norm > 0 (got {noise_multiplier}, "
                             f"{clipping_norm})")
        self.strategy = strategy
        self.noise_multiplier, self.clipping_norm, self.seed = noise_multiplier, clipping_norm, seed
        strategy.uniform = True
        self._clipped: set[int] = set()  # the partitions whose reply of this round is clipped already
        self._long = 0  # of those, how many were longer than C

    def __getattr__(self, name: str):  # what DP does not change: the strategy's own
        return getattr(self.strategy, name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._clipped, self._long = set(), 0
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def accept(self, server_round: int, replies: Iterable[Message]) -> int:
        """The strategy's checks, then each newly accepted reply clipped: the round's start plus its
        update scaled to norm at most C."""
        valid = self.strategy.accept(server_round, replies)
        start = {k: t.numpy() for k, t in self.strategy.round_start().items()}
        for pid, reply in self.strategy.accepted.items():
            if pid in self._clipped:
                continue
            updates = {k: a.astype(np.float64) - start[k] for k, a in reply.arrays.items()}
            norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in updates.values())))
            if norm > self.clipping_norm:  # an update of norm 0 (a client sent back what it got) stays as it is
                scale = self.clipping_norm / norm
                reply.arrays = {k: (start[k] + u * scale).astype(reply.arrays[k].dtype) for k, u in updates.items()}
                self._long += 1
            self._clipped.add(pid)
        return valid

    def finish_train(self, server_round: int) -> tuple[ArrayRecord, MetricRecord]:
        """The sum of the m clipped updates over n = clients_per_round (the mean when all n replied;
        fewer count as zero updates, so that one client's sensitivity is C / n whoever replied), with
        noise N(0, (σ C / n)²) added to every array that travelled up; a round that aggregated nothing
        released nothing."""
        arrays, metrics = self.strategy.finish_train(server_round)  # the start plus the uniform mean
        m, n = int(metrics["num-clients"]), self.strategy.clients_per_round
        metrics["dp-released"] = int(m > 0)
        if m:
            std = compute_stdv(self.noise_multiplier, self.clipping_norm, n)
            gen = cpu_generator(derive_seed(self.seed, "central-dp", server_round))
            state = self.strategy.model.state_dict()
            with torch.no_grad():
                for key, start in self.strategy.round_start().items():
                    t = state[key]
                    mean = t.double() - start.double()
                    noise = torch.normal(0.0, std, tuple(t.shape), generator=gen, dtype=torch.float64)
                    t.copy_((start.double() + mean * (m / n) + noise).to(t.dtype))
                    if key.endswith("running_var"):  # post-processing: a variance is not negative
                        t.clamp_(min=0.0)
            metrics["dp-clipped"] = self._long / m
            log.info("round %d: central DP noise of std %.4g on the sum of %d clipped updates over %d (%d of them "
                     "longer than C=%g)", server_round, std, m, n, self._long, self.clipping_norm)
            arrays = self.strategy.global_arrays()
        return arrays, metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.accept(server_round, replies)
        return self.finish_train(server_round)
