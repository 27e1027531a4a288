"""FedMUD and the factorized-model baselines (FedLMT, FedPara): the server averages what clients trained.

The global state is a model whose adapted layers are factorized (`fedlora.decompose`). What travels:
- up: the trained factors, the dense layers and the BatchNorm statistics; never a frozen tensor;
- down: the global state; frozen factors never (clients regenerate them from `factor-seed`), and, in a
  round that redraws the factors, not the trainable factors either (they are drawn from the same seed).

FedMUD (factorizations of the update, W + ΔW): at the start of every `interval`-th round the server
folds the averaged ΔW into W and redraws the factors from a round seed, so each client starts with
ΔW = 0. The average of trained factors is the average of the clients' ΔW exactly when ΔW is linear in
them (AAD); otherwise (plain low-rank or Kronecker, both factors trained) it is the paper's inexact
baseline. FedLMT and FedPara factorize the weight itself and never redraw.

Downlink, `method.downlink`:
- `global` (default): each sampled client receives the global state as above;
- `broadcast_update` (FedMUD): after each round but the last, the server sends the aggregated update
  (the averaged uplink tensors) to every client, which applies it to its own replica of the global
  model, kept in its Flower node state; train messages then carry no arrays, only the seeds and the
  replica's version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig
from torch import nn

from fedlora.decompose import factor_keys, reset_factors
from fedlora.ledger import Ledger
from fedlora.task import (APPLY_UPDATE, arrays_to_model, factor_seed, initial_model, model_to_arrays, start_round,
                          uplink_keys)
from strategies.fedavg import FedAvgStrategy
from strategies.validation import Spec, array_spec, node_of_reply

log = logging.getLogger("fedlora")


class FactorizedStrategy(FedAvgStrategy):
    def __init__(self, cfg: DictConfig, node_of_partition: dict[int, int], ledger: Ledger,
                 examples_of_partition: dict[int, int] | None = None):
        super().__init__(cfg, node_of_partition, ledger, examples_of_partition)
        self.model = initial_model(cfg)  # the server's copy, to fold and redraw
        self.factor_seed = factor_seed(cfg, 0)  # the seed the current factors were drawn from
        self.global_state: ArrayRecord | None = None
        self.broadcast = cfg.method.downlink == "broadcast_update"
        self.grid: Grid | None = None

    def load_global(self, model: nn.Module, arrays: ArrayRecord) -> nn.Module:
        # the frozen factors are not in the arrays: draw them from the seed the global state uses
        reset_factors(model, self.factor_seed)
        return arrays_to_model(model, arrays)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.grid = grid  # for the broadcast at the end of the round
        return super().configure_train(server_round, arrays, config, grid)

    def round_payload(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict, Spec]:
        self.load_global(self.model, arrays)
        seed = start_round(self.model, self.cfg, server_round)
        redraw = seed is not None
        if redraw:
            self.factor_seed = seed
        self.global_state = model_to_arrays(self.model)
        up = set(uplink_keys(self.model))
        expected = {k: v for k, v in array_spec(self.global_state).items() if k in up}
        extra = {"factor-seed": self.factor_seed, "redraw": redraw}
        if self.broadcast:  # the clients hold the global state already, as of the last round's update
            return ArrayRecord(), extra | {"version": server_round - 1}, expected
        regenerated = factor_keys(self.model) if redraw else set()
        down = ArrayRecord({k: a for k, a in self.global_state.items() if k not in regenerated})
        return down, extra, expected

    def new_global(self, aggregated: dict[str, np.ndarray]) -> ArrayRecord:
        merged = dict(self.global_state.items())
        merged.update({k: Array(v) for k, v in aggregated.items()})
        return ArrayRecord(merged)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        # With no valid reply the global state stays the round's starting state (which has folded and
        # redrawn if this round does; the arrays the round started from have not).
        arrays = arrays if arrays is not None else self.global_state
        if self.broadcast and server_round < self.cfg.num_rounds:
            self.broadcast_update(server_round, arrays)
        return arrays, metrics

    def broadcast_update(self, server_round: int, arrays: ArrayRecord) -> None:
        """Send every client the round's aggregated update (the uplink tensors) for its replica, and wait
        for the acknowledgements. (After the last round there is no next round to prepare: no broadcast.)"""
        update = ArrayRecord({k: a for k, a in arrays.items() if k in self.expected})
        config = ConfigRecord({"fedlora.config": self.config_json, "version": server_round,
                               "factor-seed": self.factor_seed})
        messages = []
        for pid, node in sorted(self.node_of_partition.items()):
            content = RecordDict({"arrays": ArrayRecord(dict(update.items())), "config": ConfigRecord(dict(config))})
            msg = Message(content, dst_node_id=node, message_type=f"{MessageType.TRAIN}.{APPLY_UPDATE}",
                          group_id=f"{server_round}-update")
            self.ledger.sent(msg)
            messages.append(msg)
        acked = 0
        for reply in self.grid.send_and_receive(messages, timeout=self.cfg.simulation.round_timeout):
            self.ledger.received(reply)
            if reply.has_error():
                log.warning("round %d: node %d did not apply the update: %s", server_round,
                            node_of_reply(reply, messages), reply.error.reason)
            else:
                acked += 1
        if acked < len(messages):
            log.warning("round %d: %d of %d clients applied the update; the replicas of the others are out of "
                        "date, and their replies will be rejected for the rest of the run", server_round, acked,
                        len(messages))
