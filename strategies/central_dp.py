"""Central differential privacy with server-side fixed clipping (DP-FedAvg: McMahan et al., 2018;
Andrew et al., 2021), as a wrapper around the strategy, in the shape of Flower's
`DifferentialPrivacyServerSideFixedClipping`, with its helpers for the clipping and the noise's scale.

Each valid reply's update (what it sent minus what the round started from, over every array that
travels up) is clipped to norm C; the replies are averaged with equal weights (the accounting holds
for uniform averaging only: with example weights one client's share, and so its sensitivity, could
be larger than 1/m); Gaussian noise of standard deviation σ C / m is added to the average of the m
replies aggregated. What the server does with the noised average afterwards (FedMUD's fold, the
broadcast, clamping BatchNorm's running variances at 0) is post-processing and costs no privacy.

Why not Flower's class itself: it pairs a reply's arrays with the global model's by position (here a
reply carries what the method sends up, a part of the global state), noises everything its inner
strategy returns (here the global state, the frozen weights of FedMUD or FLoRA too), draws its noise
from NumPy's global generator (here it is drawn from the run seed and the round, so that a resumed
run is the run never stopped), and gives up a round when fewer replies came than were sampled.

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
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv

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
        self._clipped: set[int] = set()
        self.clipped_fraction = 0.0  # of the last round's aggregated updates, how many were longer than C

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
            keys = list(reply.arrays)
            sent = [start[k] for k in keys]
            arrays = [np.array(reply.arrays[k], copy=True) for k in keys]
            norm = float(np.sqrt(sum(np.sum((a.astype(np.float64) - s) ** 2) for a, s in zip(arrays, sent))))
            compute_clip_model_update(arrays, sent, self.clipping_norm)
            reply.arrays = dict(zip(keys, arrays))
            self._long += norm > self.clipping_norm
            self._clipped.add(pid)
        return valid

    def finish_train(self, server_round: int) -> tuple[ArrayRecord, MetricRecord]:
        """The strategy's uniform average of the clipped updates, with noise N(0, (σ C / m)²) added to
        every array that travelled up; a round that aggregated nothing released nothing."""
        arrays, metrics = self.strategy.finish_train(server_round)
        m = int(metrics["num-clients"])
        metrics["dp-released"] = int(m > 0)
        if m:
            std = compute_stdv(self.noise_multiplier, self.clipping_norm, m)
            gen = cpu_generator(derive_seed(self.seed, "central-dp", server_round))
            state = self.strategy.model.state_dict()
            with torch.no_grad():
                for key in self.strategy.round_start():
                    t = state[key]
                    t.add_(torch.normal(0.0, std, tuple(t.shape), generator=gen).to(t.dtype))
                    if key.endswith("running_var"):  # post-processing: a variance is not negative
                        t.clamp_(min=0.0)
            metrics["dp-clipped"] = self._long / m
            log.info("round %d: central DP noise of std %.4g on the average of %d clipped updates (%d of them "
                     "longer than C=%g)", server_round, std, m, self._long, self.clipping_norm)
            arrays = self.strategy.global_arrays()
        return arrays, metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.accept(server_round, replies)
        return self.finish_train(server_round)
