"""The fedlora ClientApp: the same code in Ray virtual clients and on real SuperNodes.

The run's config reaches a node once, in the query that opens the run, and stays in its Flower node
state; a train message carries the round, the client's partition and its training seed, and the
arrays that the method sends down. From the config, the client builds the same method as the server
(`fedlora.methods`), which says what it trains, what it must have received and what it sends back.
Under a method that broadcasts (method.downlink=broadcast_update: FedMUD, FLoRA, FedEx-LoRA), the client
keeps a replica of the global model in its node state instead, updated after every round.

Under a personalised method (FedSA-LoRA) the client keeps what it never sends (its B) in its node
state too. Under eval.clients it trains on all but a seeded held-out fraction of its data and answers
the server's evaluate message with its accuracy on that fraction.

A process builds its model once per run (and adapter rank) and reuses it for every client and round it serves: what
the method draws from the seeds and what the server sends overwrite everything that training changes.

What a node holds itself is its node config:
- `partition-id` (required): who it is; with the shared data, which partition it trains on;
- `num-partitions` (optional): checked against the run's num_clients before the first round;
- `data-root` (optional): where this node finds the shared data set (by default the run's data.root
  where that exists on the node, else the node's FEDLORA_DATA);
- `local-data` (optional): this node's own data, all of it (no partitioning): a folder laid out like
  a data root (its training split), or under dataset=hf a file or folder in its formats, read with
  the run's columns and class names; the server learns only how many examples it holds;
- `rank` (optional): the adapter rank this node trains, under a method that takes heterogeneous
  ranks (an edge GPU with less memory trains a smaller adapter);
- `num-threads` (optional): torch threads; by default torch's, which Ray sets to a virtual client's
  CPU share.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedlora.config import from_json
from fedlora.data import has_dataset
from fedlora.dp import client_spec
from fedlora.dp import client_side as dp_client_side
from fedlora.federated_data import client_tensors, local_tensors, split_for_clients, train_count
from fedlora.methods import Method, make_method
from fedlora.paths import absolute
from fedlora.protocol import (APPLY_UPDATE, CONFIG, FAIL, FAULT, FULL, INIT_UPDATE, NO_CONFIG, NO_FIXED, PARTITION, RANK,
                              ROUND, SEED, STRAGGLE)
from fedlora.state import load_arrays, state_tensors
from fedlora.training import evaluate, train_local

app = ClientApp()

# In the node state: the run's config; under a method that broadcasts, this node's replica of the
# global model and the round whose update it holds; under a personalised method, its own factors.
RUN_CONFIG, REPLICA, REPLICA_ROUND = "fedlora.run-config", "fedlora.replica", "fedlora.replica-round"
PERSONAL = "fedlora.personal"  # what the client keeps for itself (FedSA-LoRA's B)
FIXED = "fedlora.fixed"  # what the server sent once and never changes (Fed-SB's B and A)


@dataclass
class ClientRun:
    """What a process builds once per run: the config, the method, the model it trains, and that
    model's initial global and personal state (the replica's starting point, and a client's own
    factors before it first trained)."""

    cfg: DictConfig
    method: Method
    model: nn.Module
    initial: dict[str, torch.Tensor]


@lru_cache(maxsize=8)  # a process may serve clients of several adapter ranks
def _client_run(config_json: str, rank: int | None = None) -> ClientRun:
    cfg = from_json(config_json)
    method = make_method(cfg)
    model = method.initial_model(rank)
    if cfg.model.get("packing"):  # this node's transformers must keep packed examples apart too
        from fedlora.causal import check_packing

        check_packing(model, cfg.model.hf)
    return ClientRun(cfg, method, model, state_tensors(model, method.global_keys(model) + method.personal_keys(model)))


def _keep_config(context: Context, config: ConfigRecord) -> None:
    """Keep the run's config that a message carries (the opening query, or a train message to a node
    that lost it) in the node state."""
    if CONFIG in config:
        context.state[RUN_CONFIG] = ConfigRecord({CONFIG: str(config[CONFIG])})


def _run_of(context: Context, config: ConfigRecord) -> ClientRun:
    """The run this node serves, from the config in its node state (or in `config`, which is kept),
    with its model at the adapter rank that `config` gives (under heterogeneous ranks)."""
    _keep_config(context, config)
    record = context.state.config_records.get(RUN_CONFIG)
    if record is None:
        raise ValueError(f"this node {NO_CONFIG}: it was not asked its partition as the run started (it joined "
                         "later, or was restarted); the server sends it with the node's next train message")
    return _client_run(str(record[CONFIG]), int(config[RANK]) if RANK in config else None)


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this node has no 'partition-id' in its node config "
                         "(start it with --node-config \"partition-id=N num-partitions=M\")")
    return int(context.node_config["partition-id"])


def _asked_partition(config: ConfigRecord, context: Context) -> int:
    """The partition a message asks for, which must be this node's."""
    pid = int(config[PARTITION])
    if pid != _partition_id(context):
        raise ValueError(f"server asked for partition {pid}, this node holds {_partition_id(context)}")
    return pid


def _training_data(cfg: DictConfig, context: Context, partition_id: int):
    """This node's training tensors: its own data, or its partition of the shared data set, read from
    the node's `data-root`, else from the run's data.root where that exists here (the same machine, a
    simulation), else from this node's FEDLORA_DATA."""
    node = context.node_config
    if "local-data" in node:
        return local_tensors(cfg, absolute(node["local-data"], "node config local-data", must_exist=True))
    if cfg.dataset.name == "hf":  # at dataset.path, not under a data root
        return client_tensors(cfg, partition_id)
    root = cfg.data.root
    if "data-root" in node:
        root = absolute(node["data-root"], "node config data-root", must_exist=True)
    elif not has_dataset(cfg.dataset.name, root) and os.environ.get("FEDLORA_DATA"):
        root = absolute(os.environ["FEDLORA_DATA"], "FEDLORA_DATA", must_exist=True)
    if root != cfg.data.root:
        cfg = OmegaConf.merge(cfg, {"data": {"root": root}})
    return client_tensors(cfg, partition_id)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is (its partition id, and the number of partitions it was told of) and, for a
    node with its own data, how many training examples it holds. The run's config, which the query
    carries, is kept in the node state for the rest of the run."""
    config = msg.content["config"]
    _keep_config(context, config)
    info = ConfigRecord({"partition-id": _partition_id(context)})
    if "num-partitions" in context.node_config:
        info["num-partitions"] = int(context.node_config["num-partitions"])
    if RANK in context.node_config:  # the adapter rank this node trains, under heterogeneous ranks
        info[RANK] = int(context.node_config[RANK])
    if "local-data" in context.node_config:
        cfg = from_json(str(config[CONFIG]))
        pid = _partition_id(context)
        info["num-examples"] = train_count(cfg, pid, len(_training_data(cfg, context, pid)[1]))
    return Message(RecordDict({"info": info}), reply_to=msg)


def _replica(run: ClientRun, context: Context, server_round: int) -> nn.Module:
    """The process's model holding this client's replica of the global model as `server_round`
    starts. Before the first update arrives, that is the initial model as round 1 starts."""
    held = int(context.state.config_records[REPLICA_ROUND]["round"]) if REPLICA_ROUND in context.state else 0
    if held != server_round - 1:
        raise ValueError(f"this client's replica of the global model holds the update of round {held}, the server "
                         f"is at round {server_round}: it missed broadcast updates (was the node restarted?)")
    method, model = run.method, run.model
    if held == 0:
        method.load(model, run.initial, 0, required=run.initial)
        method.start_round(model, 1)
    else:
        method.load(model, context.state.array_records[REPLICA], server_round, required=method.global_keys(model))
    return model


def _with_personal(run: ClientRun, context: Context, model: nn.Module) -> nn.Module:
    """The model with what this client keeps for itself: as it last left it, or its initial value."""
    keys = run.method.personal_keys(model)
    if keys:
        own = context.state.array_records.get(PERSONAL)
        load_arrays(model, own if own is not None else {k: run.initial[k] for k in keys}, required=keys)
    return model


def _received(run: ClientRun, context: Context, arrays, server_round: int) -> nn.Module:
    """The model as the server sent it for `server_round`: the arrays, and what it sent once and this
    node keeps (the method's fixed state), which the arrays carry only the first time."""
    method, model = run.method, run.model
    fixed = method.fixed_keys(model)
    if fixed and all(k in arrays for k in fixed):
        context.state[FIXED] = ArrayRecord({k: arrays[k] for k in fixed})
    elif fixed and FIXED not in context.state.array_records:
        raise ValueError(f"this node {NO_FIXED} (it was restarted): the server sends it with the next train message")
    needed = [k for k in method.down_keys(model, server_round) if k not in fixed]
    model = method.load(model, arrays, server_round, required=needed)
    if fixed:
        load_arrays(model, context.state.array_records[FIXED], required=fixed)
    return model


def _partition_data(run: ClientRun, context: Context, pid: int, held_out: bool = False):
    """This client's (x, y) to train on, or (held_out) to evaluate on under eval.clients."""
    train, held = split_for_clients(run.cfg, pid, *_training_data(run.cfg, context, pid))
    return held if held_out else train


@app.train(APPLY_UPDATE)
def apply_update(msg: Message, context: Context) -> Message:
    """Apply a broadcast update to this client's replica and start the next round as the server does."""
    config = msg.content["config"]
    run = _run_of(context, config)
    updated = int(config[ROUND])  # the round whose update this is
    if config.get(FULL, False):  # the whole global state after that round (a resumed run): a replica afresh
        model = run.method.load(run.model, msg.content["arrays"], updated, required=run.method.global_keys(run.model))
        run.method.start_round(model, updated + 1)
    else:
        model = _replica(run, context, updated)
        run.method.apply_broadcast(model, msg.content["arrays"], updated)
    context.state[REPLICA] = ArrayRecord(state_tensors(model, run.method.global_keys(model)))
    context.state[REPLICA_ROUND] = ConfigRecord({"round": updated})
    return Message(RecordDict(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config = msg.content["config"]
    run = _run_of(context, config)
    server_round, pid = int(config[ROUND]), _asked_partition(config, context)
    if config.get(FAULT) == FAIL:
        raise RuntimeError(f"failed on purpose (simulation.faults.fail_rate={run.cfg.simulation.faults.fail_rate})")
    if config.get(FAULT) == STRAGGLE:  # then trains and replies, after the server stopped waiting
        time.sleep(run.cfg.simulation.round_timeout + 1)
    if "num-threads" in context.node_config:
        torch.set_num_threads(int(context.node_config["num-threads"]))
    x, y = _partition_data(run, context, pid)
    examples = len(y)  # what the reply weighs by, packed or not
    if run.cfg.model.get("packing"):  # a causal LM's examples, as many to a row as fit
        from fedlora.causal import pack

        x = pack(x)
        y = y.new_zeros(len(x))
    method = run.method
    if method.broadcasts:
        model = _replica(run, context, server_round)
    else:
        model = _received(run, context, msg.content["arrays"], server_round)
    _with_personal(run, context, model)
    method.set_trainable(model, server_round)
    spec = client_spec(run.cfg, examples) if dp_client_side(run.cfg) else None
    loss = train_local(model, x, y, run.cfg.local, seed=int(config[SEED]), dp=spec)
    if method.personal_keys(model):
        context.state[PERSONAL] = ArrayRecord(state_tensors(model, method.personal_keys(model)))
    reply = ArrayRecord(state_tensors(model, method.up_keys(model, server_round)))
    metrics = MetricRecord({"num-examples": examples, "train_loss": loss,
                            "client-seconds": time.perf_counter() - started})  # where a round's time goes
    return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)


@app.train(INIT_UPDATE)
def init_update(msg: Message, context: Context) -> Message:
    """A method that initialises from the clients' data (Fed-SB): this client's share, from the
    initial model and its own training examples."""
    config = msg.content["config"]
    run = _run_of(context, config)
    pid = _asked_partition(config, context)
    x, y = _partition_data(run, context, pid)
    run.method.load(run.model, run.initial, 0, required=run.initial)
    arrays, count, loss = run.method.init_update(run.model, x, y, int(config[SEED]))
    return Message(RecordDict({"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"num-examples": count, "train_loss": loss})}), reply_to=msg)


@app.evaluate()
def evaluate_client(msg: Message, context: Context) -> Message:
    """Under eval.clients: the accuracy and loss, on this client's held-out examples, of the model it
    would start the next round from (the global model of the round, with what it keeps for itself)."""
    config = msg.content["config"]
    run = _run_of(context, config)
    server_round, pid = int(config[ROUND]), _asked_partition(config, context)
    x, y = _partition_data(run, context, pid, held_out=True)
    arrays = msg.content["arrays"]
    model = _with_personal(run, context, run.method.load(run.model, arrays, server_round, required=arrays.keys()))
    accuracy, loss = evaluate(model, x, y, run.cfg.eval.batch_size)
    return Message(RecordDict({"metrics": MetricRecord({"accuracy": accuracy, "loss": loss, "num-examples": len(y)})}),
                   reply_to=msg)
