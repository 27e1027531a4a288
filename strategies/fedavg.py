"""FedAvg over fedlora's message layout, the base of fedlora's strategies.

Kept apart, as in Flower's own strategies: sampling (`sample`), one message per client
(`client_content`), reply checking (`parse_train_reply`) and aggregation (`aggregate`). Every message
each way passes through the ledger, which measures the serialized arrays it carries.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig
from torch import nn

from fedlora.config import to_json
from fedlora.errors import FedloraError
from fedlora.ledger import Ledger
from fedlora.seeds import derive_seed
from fedlora.task import arrays_to_model
from strategies.validation import ReplyRejected, Spec, TrainReply, array_spec, node_of_reply, parse_train_reply

log = logging.getLogger("fedlora")


class FedAvgStrategy(Strategy):
    """Sample clients_per_round partitions, send each the global arrays, average the replies weighted by
    their number of examples (in float64, in partition order, so that the result does not depend on
    the order in which replies arrive)."""

    def __init__(self, cfg: DictConfig, node_of_partition: dict[int, int], ledger: Ledger,
                 examples_of_partition: dict[int, int] | None = None):
        self.cfg = cfg
        self.node_of_partition = node_of_partition
        self.ledger = ledger
        # A client's reply must count exactly its partition's examples, where the server knows them,
        # so that no client can weigh more in the average than its data does.
        self.examples_of_partition = examples_of_partition
        self.config_json = to_json(cfg)
        self.round_stats: dict[int, dict] = {}
        self.expected: Spec = {}  # this round's arrays: key -> (shape, dtype)
        self.sampled: list[int] = []  # this round's partition ids
        self.sent: list[Message] = []  # this round's messages

    # --- sampling ---------------------------------------------------------------------------------
    def sample(self, server_round: int) -> list[int]:
        """Sorted partition ids of this round's clients, from the run seed and the round alone."""
        available = sorted(self.node_of_partition)
        k = min(self.cfg.clients_per_round, len(available))
        rng = random.Random(derive_seed(self.cfg.seed, "sample", server_round))
        return sorted(rng.sample(available, k))

    # --- what travels (the hooks of the factorized strategies) -----------------------------------
    def round_payload(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict, Spec]:
        """This round's arrays for the clients, extra config for them, and what each must send back.
        FedAvg: the global arrays, and the same arrays back."""
        return arrays, {}, array_spec(arrays)

    def load_global(self, model: nn.Module, arrays: ArrayRecord) -> nn.Module:
        """The global model that `arrays` describe, in `model` (a fresh initial_model), for evaluation."""
        return arrays_to_model(model, arrays)

    def new_global(self, aggregated: dict[str, np.ndarray]) -> ArrayRecord:
        """The global arrays after aggregation (FedAvg: the average itself)."""
        return ArrayRecord({k: Array(v) for k, v in aggregated.items()})

    # --- messages ---------------------------------------------------------------------------------
    def client_content(self, server_round: int, partition_id: int, arrays: ArrayRecord,
                       extra: dict | None = None) -> RecordDict:
        """The content of one client's message: its own RecordDict, so a per-client payload never leaks
        into another's message."""
        config = ConfigRecord({
            "fedlora.config": self.config_json,
            "round": server_round,
            "partition-id": partition_id,
            "seed": derive_seed(self.cfg.seed, "train", server_round, partition_id),
            **(extra or {}),
        })
        return RecordDict({"arrays": ArrayRecord(dict(arrays.items())), "config": config})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.ledger.start_round()
        self.round_stats[server_round] = {"started": time.time()}
        down, extra, self.expected = self.round_payload(server_round, arrays)
        self.sampled = self.sample(server_round)
        self.sent = [Message(self.client_content(server_round, pid, down, extra), dst_node_id=self.node_of_partition[pid],
                             message_type=MessageType.TRAIN, group_id=str(server_round)) for pid in self.sampled]
        for msg in self.sent:
            self.ledger.sent(msg)
        return self.sent

    # --- replies ----------------------------------------------------------------------------------
    def accept(self, server_round: int, replies: Iterable[Message]) -> list[tuple[int, TrainReply]]:
        """The valid replies as (partition id, reply), sorted by partition; the others are logged.
        Raises FedloraError when every client of the round failed outright (an error, not a bad
        reply): the same failure would repeat every round."""
        partition_of_node = {n: p for p, n in self.node_of_partition.items()}
        accepted: dict[int, TrainReply] = {}
        rejected, errors = 0, []
        for msg in replies:
            self.ledger.received(msg)
            pid = partition_of_node.get(node_of_reply(msg, self.sent), -1)
            try:
                if msg.has_error():
                    errors.append(msg.error.reason)
                    raise ReplyRejected(f"the client failed: {msg.error.reason}")
                if pid not in self.sampled:
                    raise ReplyRejected("not sampled this round")
                if pid in accepted:
                    raise ReplyRejected("a second reply in this round")
                reply = parse_train_reply(msg.content, self.expected)
                expected = (self.examples_of_partition or {}).get(pid, reply.num_examples)
                if reply.num_examples != expected:
                    raise ReplyRejected(f"claims {reply.num_examples} examples, its partition has {expected}")
                accepted[pid] = reply
            except ReplyRejected as e:
                log.warning("round %d: rejected the reply of client %d: %s", server_round, pid, e)
                rejected += 1
        if errors and not accepted and len(errors) == rejected:
            raise FedloraError(f"round {server_round}: every client failed; the first said: {errors[0]}")
        self.round_stats[server_round].update(num_clients=len(accepted), rejected=rejected)
        return sorted(accepted.items())

    def aggregate(self, replies: list[TrainReply]) -> dict[str, np.ndarray]:
        total = sum(r.num_examples for r in replies)
        out = {}
        for key, (shape, dtype) in self.expected.items():
            acc = np.zeros(shape, np.float64)
            for r in replies:
                acc += r.arrays[key].astype(np.float64) * (r.num_examples / total)
            out[key] = acc.astype(dtype)
        return out

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.accept(server_round, replies)
        if not accepted:
            log.warning("round %d: no valid reply; the global model stays as it was", server_round)
            self.round_stats[server_round]["train_loss"] = float("nan")
            return None, None
        replies_ = [r for _, r in accepted]
        total = sum(r.num_examples for r in replies_)
        loss = sum(r.train_loss * r.num_examples for r in replies_) / total
        self.round_stats[server_round]["train_loss"] = loss
        return self.new_global(self.aggregate(replies_)), MetricRecord({"train_loss": loss, "num-examples": total})

    # --- no client-side evaluation: the server evaluates the global model on the full test set -----
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("%s: %d clients, %d per round, %d rounds", type(self).__name__, self.cfg.num_clients,
                 self.cfg.clients_per_round, self.cfg.num_rounds)
