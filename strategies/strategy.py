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

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
import torch
from torch import nn

from fedlora.aggregate import Update
from fedlora.errors import FedloraError
from fedlora.methods import Method
from fedlora.parametrizations.adapters import at_rank
from fedlora.protocol import (APPLY_UPDATE, CONFIG, FAIL, FAULT, FULL, INIT_UPDATE, NO_CONFIG, NO_FIXED, PARTITION, RANK,
                              ROUND, SEED, STRAGGLE)
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
                 seed: int, examples_of_partition: dict[int, int] | None = None, config_json: str = "",
                 node_ranks: dict[int, int] | None = None, evaluate_clients: bool = False, min_replies: int = 1,
                 faults: dict | None = None):
        self.method, self.model = method, model
        self.node_of_partition = node_of_partition
        self.clients_per_round, self.seed = clients_per_round, seed
        # A client's reply must count exactly its partition's examples, where the server knows them,
        # so that no client can weigh more in the average than its data does.
        self.examples_of_partition = examples_of_partition or {}
        # The run's config, for a node that lost it (it restarted): sent again with its next train message.
        self.config_json, self.lost_config = config_json, set()
        self.evaluate_clients = evaluate_clients  # eval.clients: every client evaluates after every round
        # Under heterogeneous ranks, each client's adapter rank: its node's own `rank`, else the method's tiers.
        self.rank_of_partition = {pid: (node_ranks or {}).get(pid, method.rank_of(pid)) for pid in node_of_partition}
        self.expected: Spec = {}  # this round's reply arrays at the global model's shapes: key -> (shape, dtype)
        self.expected_of: dict[int, Spec] = {}  # each sampled client's, at its own rank
        self.holding: set[int] = set()  # the clients that hold the method's fixed state (they trained with it)
        self.sampled: list[int] = []  # this round's partition ids (a retry's too)
        self.sent: list[Message] = []  # this round's messages
        # this round's valid replies by partition, error reasons, rejected count, and who replied
        self.accepted: dict[int, TrainReply] = {}
        self.errors: list[str] = []
        self.rejected, self.replied, self.trained = 0, set(), set()  # and who trained (answered without an error)
        self.min_replies = min_replies
        self.fail_rate, self.straggle_rate = (faults or {}).get("fail_rate", 0.0), (faults or {}).get("straggle_rate", 0.0)
        # every client's counts over the run: accepted, rejected, failed, timed out (and the last reason)
        self.clients: dict[int, dict] = {}
        self.uniform = False  # weigh every valid reply alike, not by its examples (central DP: central_dp.py)

    def global_arrays(self) -> ArrayRecord:
        return ArrayRecord(state_tensors(self.model, self.method.global_keys(self.model)))

    def round_start(self) -> dict[str, torch.Tensor]:
        """What the clients of the round in progress send up, as the round started."""
        return self._round[0]

    def sample(self, server_round: int) -> list[int]:
        return sample(self.node_of_partition, self.clients_per_round, self.seed, server_round)

    # --- a round's messages -----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        load_arrays(self.model, arrays)
        self.method.start_round(self.model, server_round)
        up = state_tensors(self.model, self.method.up_keys(self.model, server_round))
        self.expected = tensor_spec(up)
        self._round = (up, state_tensors(self.model, self.method.down_keys(self.model, server_round)))
        self.sampled, self.sent, self.expected_of = [], [], {}
        self.accepted, self.errors, self.rejected, self.replied, self.trained = {}, [], 0, set(), set()
        return self._train_messages(server_round, self.sample(server_round), "")

    def configure_retry(self, server_round: int) -> list[Message]:
        """Messages to `clients_per_round` more clients of `server_round`, drawn from its seed among
        those not asked yet (none are left: no message), for a round with too few valid replies."""
        untried = sorted(set(self.node_of_partition) - set(self.sampled))
        rng = random.Random(derive_seed(self.seed, "sample", server_round, "retry"))
        return self._train_messages(server_round, sorted(rng.sample(untried, min(self.clients_per_round, len(untried)))),
                                    "retry")

    def _train_messages(self, server_round: int, pids: list[int], attempt: str) -> list[Message]:
        up, down = self._round
        fixed = set(self.method.fixed_keys(self.model))
        faults = self._faults(server_round, pids, attempt)
        messages = []
        # the largest clients first: a simulation hands them to its actors in this order, so that the
        # last to start is a small one, not a large one that keeps the round waiting on one actor
        for pid in sorted(pids, key=lambda p: (-self.examples_of_partition.get(p, 0), p)):
            # each client its own RecordDict, so that a per-client payload never leaks into another's message
            seed = derive_seed(self.seed, "train", server_round, pid)
            config = ConfigRecord({ROUND: server_round, PARTITION: pid, SEED: seed})
            rank = self.rank_of_partition.get(pid)
            sent = down if rank is None else at_rank(down, rank)
            if pid in self.holding:  # it keeps what never changes
                sent = {k: v for k, v in sent.items() if k not in fixed}
            self.expected_of[pid] = self.expected if rank is None else tensor_spec(at_rank(up, rank))
            if rank is not None:
                config[RANK] = rank
            if pid in faults:
                config[FAULT] = faults[pid]
            if pid in self.lost_config and self.config_json:
                config[CONFIG] = self.config_json
                self.lost_config.discard(pid)
            content = RecordDict({"arrays": ArrayRecord(dict(sent)), "config": config})
            messages.append(Message(content, dst_node_id=self.node_of_partition[pid], message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        self.sampled += pids
        self.sent += messages
        return messages

    def _faults(self, server_round: int, pids: list[int], attempt: str) -> dict[int, str]:
        """The clients told to fail or to straggle (simulation.faults): a seeded choice of the given
        fractions of them, rounded."""
        fail, straggle = (round(rate * len(pids)) for rate in (self.fail_rate, self.straggle_rate))
        if not fail + straggle:
            return {}
        chosen = random.Random(derive_seed(self.seed, "faults", server_round, attempt)).sample(pids, fail + straggle)
        return {pid: FAIL if i < fail else STRAGGLE for i, pid in enumerate(chosen)}

    # --- replies ----------------------------------------------------------------------------------
    def accept(self, server_round: int, replies: Iterable[Message]) -> int:
        """Check replies of `server_round` and keep the valid ones for `finish_train`; every other is
        rejected, logged with why. Returns how many valid replies the round has so far."""
        partition_of_node = {n: p for p, n in self.node_of_partition.items()}
        has_fixed = bool(self.method.fixed_keys(self.model))
        for msg in replies:
            pid = partition_of_node.get(node_of_reply(msg, self.sent), -1)
            try:
                if msg.has_error():
                    self.errors.append(msg.error.reason)
                    self._count(pid, "failed", msg.error.reason)
                    if NO_CONFIG in msg.error.reason:
                        self.lost_config.add(pid)
                    if NO_CONFIG in msg.error.reason or NO_FIXED in msg.error.reason:
                        self.holding.discard(pid)  # sent again when it is next sampled
                    raise ReplyRejected(f"the client failed: {msg.error.reason}")
                if pid not in self.sampled:
                    raise ReplyRejected("not sampled this round")
                self.trained.add(pid)  # it trained (what privacy it spent counts, valid reply or not)
                if pid in self.accepted:
                    raise ReplyRejected("a second reply in this round")
                reply = parse_train_reply(msg.content, self.expected_of[pid])
                expected = self.examples_of_partition.get(pid, reply.num_examples)
                if reply.num_examples != expected:
                    raise ReplyRejected(f"claims {reply.num_examples} examples, its partition has {expected}")
                self.accepted[pid] = reply
                self._count(pid, "accepted")
                if has_fixed:
                    self.holding.add(pid)  # it trained: it holds the fixed state it was sent
            except ReplyRejected as e:
                log.warning("round %d: rejected the reply of client %d: %s", server_round, pid, e)
                self.rejected += 1
                if not msg.has_error():
                    self._count(pid, "rejected", str(e))
            finally:
                self.replied.add(pid)
        return len(self.accepted)

    def _count(self, pid: int, what: str, reason: str = "") -> None:
        counts = self.clients.setdefault(pid, {"accepted": 0, "rejected": 0, "failed": 0, "timed_out": 0})
        counts[what] += 1
        if reason:
            counts["last"] = reason[:300]

    def finish_train(self, server_round: int) -> tuple[ArrayRecord, MetricRecord]:
        """The global state after the method combined the round's valid replies (the round's starting
        state when there were fewer than `min_replies`), and the round's figures: clients aggregated,
        replies rejected (failed ones among them), clients that failed, and that did not answer in
        time, examples, and the example-weighted training loss (NaN when nothing was aggregated), with
        the slowest client's own seconds and the sum of all (where the clients report them).
        Raises FedloraError when every client of the round failed outright (an error, not a bad
        reply): the same failure would repeat every round."""
        timed_out = [pid for pid in self.sampled if pid not in self.replied]
        for pid in timed_out:
            self._count(pid, "timed_out")
        if self.errors and not self.accepted and len(self.errors) == self.rejected and not timed_out:
            raise FedloraError(f"round {server_round}: every client failed; the first said: {self.errors[0]}")
        metrics = MetricRecord({"num-clients": 0, "rejected": self.rejected, "failed": len(self.errors),
                                "timed-out": len(timed_out), "num-examples": 0, "train_loss": float("nan")})
        valid = [r for _, r in sorted(self.accepted.items())]
        if len(valid) >= max(1, self.min_replies):
            self.method.aggregate(self.model, [Update(r.arrays, 1 if self.uniform else r.num_examples) for r in valid])
            total = sum(r.num_examples for r in valid)
            metrics["num-clients"], metrics["num-examples"] = len(valid), total
            metrics["train_loss"] = sum(r.train_loss * r.num_examples for r in valid) / total
            seconds = [r.seconds for r in valid if r.seconds is not None]
            if seconds:  # where a round's time goes: the slowest client, and all of them together
                metrics["client-seconds-max"], metrics["client-seconds-sum"] = max(seconds), sum(seconds)
        elif valid:
            log.warning("round %d: %d valid replies, fewer than min_replies=%d; the global model stays as it was",
                        server_round, len(valid), self.min_replies)
        else:
            log.warning("round %d: no valid reply; the global model stays as it was", server_round)
        return self.global_arrays(), metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """`accept` the replies, then `finish_train`: the round in one call."""
        self.accept(server_round, replies)
        return self.finish_train(server_round)

    def never_accepted(self) -> dict[int, dict]:
        """The clients that answered and were never once aggregated, with their counts and last reason."""
        return {pid: c for pid, c in sorted(self.clients.items())
                if not c["accepted"] and (c["rejected"] or c["failed"]) and pid >= 0}

    # --- the initialisation of a method that starts from the clients' data (Fed-SB) ------------------
    def configure_init(self) -> list[Message]:
        """Before round 1, `clients_per_round` seeded clients' messages asking for their share."""
        if not self.method.initialises:
            return []
        self.sampled = self.sample(0)
        self.sent = [Message(RecordDict({"config": ConfigRecord({ROUND: 0, PARTITION: pid,
                                                                  SEED: derive_seed(self.seed, "init", pid)})}),
                             dst_node_id=self.node_of_partition[pid], message_type=f"{MessageType.TRAIN}.{INIT_UPDATE}",
                             group_id="init")
                     for pid in self.sampled]
        return self.sent

    def aggregate_init(self, replies: Iterable[Message]) -> int:
        """Check the init replies (the method's init arrays, of the global model's shapes) and let the
        method initialise the global model from the valid ones; how many there were."""
        spec = tensor_spec(state_tensors(self.model, self.method.init_keys(self.model)))
        partition_of_node = {n: p for p, n in self.node_of_partition.items()}
        valid = {}
        for msg in replies:
            pid = partition_of_node.get(node_of_reply(msg, self.sent), -1)
            try:
                if msg.has_error():
                    raise ReplyRejected(f"the client failed: {msg.error.reason}")
                if pid not in self.sampled or pid in valid:
                    raise ReplyRejected("not asked, or a second reply")
                valid[pid] = parse_train_reply(msg.content, spec)
            except ReplyRejected as e:
                log.warning("initialisation: rejected the reply of client %d: %s", pid, e)
        if not valid:
            raise FedloraError(f"method={self.method.name} initialises from the clients' data, and no client sent a "
                               "valid share")
        self.method.initialise(self.model, [Update(r.arrays, r.num_examples) for _, r in sorted(valid.items())])
        return len(valid)

    # --- the broadcast of a method whose clients keep replicas ----------------------------------
    def configure_broadcast(self, server_round: int, full: bool = False) -> list[Message]:
        """After `server_round` (but the last), every client's message with the round's change, as the
        method's `broadcast` gives it (by default the arrays that clients send up, as aggregated, or as
        the round started without a valid reply). `full`: the whole global state instead, from which a
        client builds its replica afresh (a resumed run's nodes hold none)."""
        if not self.method.broadcasts:
            return []
        if full:
            update = state_tensors(self.model, self.method.global_keys(self.model))
        else:
            update = self.method.broadcast(self.model, server_round)
        self.sent = []
        for pid, node in sorted(self.node_of_partition.items()):
            config = ConfigRecord({ROUND: server_round, FULL: full})
            rank = self.rank_of_partition.get(pid)
            if rank is not None:  # its replica is at its own rank
                config[RANK] = rank
            sent = at_rank(update, rank) if full and rank is not None else update
            self.sent.append(Message(RecordDict({"arrays": ArrayRecord(dict(sent)), "config": config}),
                                     dst_node_id=node, message_type=f"{MessageType.TRAIN}.{APPLY_UPDATE}",
                                     group_id=f"{server_round}-update"))
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

    # --- client-side evaluation (eval.clients): every client, on its held-out examples ---------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Under eval.clients, every client's message with the global arrays after `server_round` (at its
        own rank); none otherwise: the server evaluates the global model on the test split either way."""
        if not self.evaluate_clients:
            return []
        self.sent = []
        for pid, node in sorted(self.node_of_partition.items()):
            rank = self.rank_of_partition.get(pid)
            config = ConfigRecord({ROUND: server_round, PARTITION: pid})
            if rank is not None:
                config[RANK] = rank
            sent = arrays if rank is None else at_rank({k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}, rank)
            self.sent.append(Message(RecordDict({"arrays": ArrayRecord(dict(sent)), "config": config}),
                                     dst_node_id=node, message_type=MessageType.EVALUATE, group_id=f"{server_round}-eval"))
        return self.sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' accuracies on their held-out examples: example-weighted mean, the worst client,
        and the spread (standard deviation over clients); the loss's mean; how many answered."""
        scores = []
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: node %d did not evaluate: %s", server_round, node_of_reply(reply, self.sent),
                            reply.error.reason)
                continue
            m = reply.content["metrics"]
            if int(m["num-examples"]) > 0:
                scores.append((float(m["accuracy"]), float(m["loss"]), int(m["num-examples"])))
        if not scores:
            return None
        acc = np.array([s[0] for s in scores])
        n = np.array([s[2] for s in scores], np.float64)
        return MetricRecord({"client_accuracy_mean": float((acc * n).sum() / n.sum()),
                             "client_accuracy_worst": float(acc.min()), "client_accuracy_std": float(acc.std()),
                             "client_loss_mean": float((np.array([s[1] for s in scores]) * n).sum() / n.sum()),
                             "clients_evaluated": len(scores)})

    def summary(self) -> None:
        log.info("%s: %d clients, %d per round", self.method.name, len(self.node_of_partition), self.clients_per_round)
