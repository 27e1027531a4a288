"""One Flower Strategy for every fedlora method.

Kept apart, as in Flower's own strategies: sampling (`sample`), one message per client
(`configure_train`), reply checking (`accept`, with `validation.parse_train_reply`), and aggregation,
which is the method's (`fedlora.methods`): the strategy asks it what a round sends down and expects
back, and hands it the valid replies. The strategy keeps the server's copy of the global model, the
one the method folds, redraws and aggregates into; the arrays it takes and returns are that model's
global state, as Flower's strategies take and return theirs.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedlora.aggregate import Update
from fedlora.errors import FedloraError
from fedlora.methods import Method
from fedlora.protocol import APPLY_UPDATE, CONFIG, NO_CONFIG, PARTITION, ROUND, SEED
from fedlora.seeds import derive_seed
from fedlora.state import load_arrays, state_tensors
from strategies.validation import ReplyRejected, Spec, TrainReply, node_of_reply, parse_train_reply, tensor_spec

log = logging.getLogger("fedlora")


def sample(partitions: Iterable[int], k: int, seed: int, server_round: int) -> list[int]:
    """Sorted partition ids of a round's clients, from the run seed and the round alone."""
    available = sorted(partitions)
    rng = random.Random(derive_seed(seed, "sample", server_round))
    return sorted(rng.sample(available, min(k, len(available))))


class MethodStrategy(Strategy):
    """Sample `clients_per_round` partitions, send each what the method sends down, check the replies
    and let the method combine the valid ones."""

    def __init__(self, method: Method, model: nn.Module, node_of_partition: dict[int, int], clients_per_round: int,
                 seed: int, examples_of_partition: dict[int, int] | None = None, config_json: str = ""):
        self.method, self.model = method, model
        self.node_of_partition = node_of_partition
        self.clients_per_round, self.seed = clients_per_round, seed
        # A client's reply must count exactly its partition's examples, where the server knows them,
        # so that no client can weigh more in the average than its data does.
        self.examples_of_partition = examples_of_partition or {}
        # The run's config, for a node that lost it (it restarted): sent again with its next train message.
        self.config_json, self.lost_config = config_json, set()
        self.expected: Spec = {}  # this round's reply arrays: key -> (shape, dtype)
        self.sampled: list[int] = []  # this round's partition ids
        self.sent: list[Message] = []  # this round's messages

    def global_arrays(self) -> ArrayRecord:
        return ArrayRecord(state_tensors(self.model, self.method.global_keys(self.model)))

    def sample(self, server_round: int) -> list[int]:
        return sample(self.node_of_partition, self.clients_per_round, self.seed, server_round)

    # --- a round's messages -----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        load_arrays(self.model, arrays)
        self.method.start_round(self.model, server_round)
        self.expected = tensor_spec(state_tensors(self.model, self.method.up_keys(self.model, server_round)))
        down = state_tensors(self.model, self.method.down_keys(self.model, server_round))
        self.sampled = self.sample(server_round)
        self.sent = []
        for pid in self.sampled:
            # each client its own RecordDict, so that a per-client payload never leaks into another's message
            seed = derive_seed(self.seed, "train", server_round, pid)
            config = ConfigRecord({ROUND: server_round, PARTITION: pid, SEED: seed})
            if pid in self.lost_config and self.config_json:
                config[CONFIG] = self.config_json
                self.lost_config.discard(pid)
            content = RecordDict({"arrays": ArrayRecord(dict(down)), "config": config})
            self.sent.append(Message(content, dst_node_id=self.node_of_partition[pid], message_type=MessageType.TRAIN,
                                     group_id=str(server_round)))
        return self.sent

    # --- replies ----------------------------------------------------------------------------------
    def accept(self, server_round: int, replies: Iterable[Message]) -> tuple[list[tuple[int, TrainReply]], int]:
        """The valid replies as (partition id, reply), sorted by partition, and how many were rejected
        (each logged with why). Raises FedloraError when every client of the round failed outright (an
        error, not a bad reply): the same failure would repeat every round."""
        partition_of_node = {n: p for p, n in self.node_of_partition.items()}
        accepted: dict[int, TrainReply] = {}
        rejected, errors = 0, []
        for msg in replies:
            pid = partition_of_node.get(node_of_reply(msg, self.sent), -1)
            try:
                if msg.has_error():
                    errors.append(msg.error.reason)
                    if NO_CONFIG in msg.error.reason:
                        self.lost_config.add(pid)
                    raise ReplyRejected(f"the client failed: {msg.error.reason}")
                if pid not in self.sampled:
                    raise ReplyRejected("not sampled this round")
                if pid in accepted:
                    raise ReplyRejected("a second reply in this round")
                reply = parse_train_reply(msg.content, self.expected)
                expected = self.examples_of_partition.get(pid, reply.num_examples)
                if reply.num_examples != expected:
                    raise ReplyRejected(f"claims {reply.num_examples} examples, its partition has {expected}")
                accepted[pid] = reply
            except ReplyRejected as e:
                log.warning("round %d: rejected the reply of client %d: %s", server_round, pid, e)
                rejected += 1
        if errors and not accepted and len(errors) == rejected:
            raise FedloraError(f"round {server_round}: every client failed; the first said: {errors[0]}")
        return sorted(accepted.items()), rejected

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The global state after the method combined the valid replies (the round's starting state
        when none was valid), and the round's figures: clients aggregated and rejected, examples, and
        the example-weighted training loss (NaN without a valid reply)."""
        accepted, rejected = self.accept(server_round, replies)
        metrics = MetricRecord({"num-clients": len(accepted), "rejected": rejected, "num-examples": 0,
                                "train_loss": float("nan")})
        if accepted:
            valid = [r for _, r in accepted]
            self.method.aggregate(self.model, [Update(r.arrays, r.num_examples) for r in valid])
            total = sum(r.num_examples for r in valid)
            metrics["num-examples"] = total
            metrics["train_loss"] = sum(r.train_loss * r.num_examples for r in valid) / total
        else:
            log.warning("round %d: no valid reply; the global model stays as it was", server_round)
        return self.global_arrays(), metrics

    # --- the broadcast of a method whose clients keep replicas ----------------------------------
    def configure_broadcast(self, server_round: int) -> list[Message]:
        """After `server_round` (but the last), every client's message with the round's update: the
        arrays that the clients send up, as aggregated (or as the round started, without a valid reply)."""
        if not self.method.broadcasts:
            return []
        update = state_tensors(self.model, self.expected)
        self.sent = [Message(RecordDict({"arrays": ArrayRecord(dict(update)),
                                         "config": ConfigRecord({ROUND: server_round})}),
                             dst_node_id=node, message_type=f"{MessageType.TRAIN}.{APPLY_UPDATE}",
                             group_id=f"{server_round}-update")
                     for _, node in sorted(self.node_of_partition.items())]
        return self.sent

    def aggregate_broadcast(self, server_round: int, replies: Iterable[Message]) -> int:
        """How many clients applied the update; those that did not are named in the log."""
        acked = 0
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: node %d did not apply the update: %s", server_round,
                            node_of_reply(reply, self.sent), reply.error.reason)
            else:
                acked += 1
        if acked < len(self.sent):
            log.warning("round %d: %d of %d clients applied the update; the replicas of the others are out of "
                        "date, and their replies will be rejected for the rest of the run", server_round, acked,
                        len(self.sent))
        return acked

    # --- no client-side evaluation: the server evaluates the global model on the full test set -----
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("%s: %d clients, %d per round", self.method.name, len(self.node_of_partition), self.clients_per_round)
