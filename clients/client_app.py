"""The fedlora ClientApp: the same code in Ray virtual clients and on real SuperNodes.

Everything a client needs arrives in the server's message (the resolved config, the round, its seed),
except, under method.downlink=broadcast_update, its replica of the global model, which it keeps in
its Flower node state. What it holds itself is its node config:
- `partition-id` (required): who it is; with the shared data, which partition it trains on;
- `num-partitions` (optional): checked against the run's num_clients before the first round;
- `data-root` (optional): where this node finds the shared data set (by default the run's data.root
  where that exists on the node, else the node's FEDLORA_DATA);
- `local-data` (optional): a folder laid out like a data root whose whole training split is this
  node's own data (no partitioning); the server learns only how many examples it holds;
- `num-threads` (optional): torch threads; by default torch's, which Ray sets to a virtual client's
  CPU share.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import from_json
from fedlora.data import has_dataset
from fedlora.paths import absolute
from fedlora.decompose import factor_keys, reset_factors
from fedlora.task import (APPLY_UPDATE, arrays_to_model, client_tensors, initial_model, local_tensors, model_to_arrays,
                          start_round, travelling_keys, uplink_keys)
from fedlora.training import train_local

app = ClientApp()

# Under method.downlink=broadcast_update, this node's replica of the global model, in its node state.
REPLICA, REPLICA_INFO = "fedlora.replica", "fedlora.replica-info"


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this node has no 'partition-id' in its node config "
                         "(start it with --node-config \"partition-id=N num-partitions=M\")")
    return int(context.node_config["partition-id"])


def _training_data(cfg, context: Context, partition_id: int):
    """This node's training tensors: its own data, or its partition of the shared data set, read from
    the node's `data-root`, else from the run's data.root where that exists here (the same machine, a
    simulation), else from this node's FEDLORA_DATA."""
    node = context.node_config
    if "local-data" in node:
        return local_tensors(cfg, absolute(node["local-data"], "node config local-data", must_exist=True))
    if "data-root" in node:
        cfg.data.root = absolute(node["data-root"], "node config data-root", must_exist=True)
    elif not has_dataset(cfg.dataset.name, cfg.data.root) and os.environ.get("FEDLORA_DATA"):
        cfg.data.root = absolute(os.environ["FEDLORA_DATA"], "FEDLORA_DATA", must_exist=True)
    return client_tensors(cfg, partition_id)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is (its partition id, and the number of partitions it was told of) and, for a
    node with its own data, how many training examples it holds."""
    info = ConfigRecord({"partition-id": _partition_id(context)})
    if "num-partitions" in context.node_config:
        info["num-partitions"] = int(context.node_config["num-partitions"])
    if "local-data" in context.node_config:
        cfg = from_json(str(msg.content["config"]["fedlora.config"]))
        info["num-examples"] = len(_training_data(cfg, context, _partition_id(context))[1])
    return Message(RecordDict({"info": info}), reply_to=msg)


def _received_model(cfg, config, arrays) -> nn.Module:
    """The global model from the arrays of the server's message (every method but FedMUD's
    method.downlink=broadcast_update)."""
    model = initial_model(cfg)
    required = travelling_keys(model)
    if "factor-seed" in config:
        # frozen factors (and, in a round that redraws them, the trainable ones) come from the seed
        reset_factors(model, int(config["factor-seed"]))
        if config.get("redraw"):
            required = [k for k in required if k not in factor_keys(model)]
    return arrays_to_model(model, arrays, required)


def _replica(cfg, context: Context, version: int) -> tuple[nn.Module, int]:
    """This client's own copy of the global model (method.downlink=broadcast_update) after `version`
    broadcast updates, and the seed of its factors. Before the first update, it is the initial model as
    round 1 starts: the (zero) update folded and the factors drawn from round 1's seed, as the server has it."""
    info = context.state.config_records.get(REPLICA_INFO)
    held = int(info["version"]) if info is not None else 0
    if held != version:
        raise ValueError(f"this client's replica of the global model is at version {held}, the server's at "
                         f"{version}: it missed broadcast updates (was the node restarted?)")
    model = initial_model(cfg)
    if info is None:
        return model, start_round(model, cfg, 1)
    seed = int(info["factor-seed"])
    reset_factors(model, seed)
    return arrays_to_model(model, context.state.array_records[REPLICA]), seed


@app.train(APPLY_UPDATE)
def apply_update(msg: Message, context: Context) -> Message:
    """Apply a broadcast update to this client's replica and start the next round as the server does."""
    config = msg.content["config"]
    cfg = from_json(str(config["fedlora.config"]))
    version = int(config["version"])  # the round whose update this is
    model, seed = _replica(cfg, context, version - 1)
    update = msg.content["arrays"]
    arrays_to_model(model, update, list(update.keys()))
    redrawn = start_round(model, cfg, version + 1)
    context.state[REPLICA] = model_to_arrays(model)
    context.state[REPLICA_INFO] = ConfigRecord({"version": version, "factor-seed": seed if redrawn is None else redrawn})
    return Message(RecordDict(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = from_json(str(config["fedlora.config"]))
    pid = int(config["partition-id"])
    if pid != _partition_id(context):
        raise ValueError(f"server asked for partition {pid}, this node holds {_partition_id(context)}")
    if "num-threads" in context.node_config:
        torch.set_num_threads(int(context.node_config["num-threads"]))
    x, y = _training_data(cfg, context, pid)
    if cfg.method.downlink == "broadcast_update":
        model, seed = _replica(cfg, context, int(config["version"]))
        if seed != int(config["factor-seed"]):
            raise ValueError(f"this client's replica holds factors drawn from seed {seed}, the server's from "
                             f"{config['factor-seed']}")
    else:
        model = _received_model(cfg, config, msg.content["arrays"])
    loss = train_local(model, x, y, cfg.local, seed=int(config["seed"]))
    metrics = MetricRecord({"num-examples": len(y), "train_loss": loss})
    reply = model_to_arrays(model, uplink_keys(model))
    return Message(RecordDict({"arrays": reply, "metrics": metrics}), reply_to=msg)
