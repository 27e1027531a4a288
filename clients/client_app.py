"""The fedlora ClientApp: the same code in Ray virtual clients and on real SuperNodes.

Everything a client needs arrives in the server's message (the resolved config, the round, its seed);
what it holds itself is its node config: `partition-id` (required), and optionally `data-root` (its own
data folder, instead of the config's data.root) and `num-threads` (torch threads; by default torch's,
which Ray sets to a virtual client's CPU share).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.config import from_json
from fedlora.task import arrays_to_model, client_tensors, initial_model, model_to_arrays
from fedlora.training import train_local

app = ClientApp()


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this node has no 'partition-id' in its node config "
                         "(start it with --node-config \"partition-id=N num-partitions=M\")")
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    info = ConfigRecord({"partition-id": _partition_id(context)})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = from_json(str(config["fedlora.config"]))
    if "data-root" in context.node_config:
        cfg.data.root = str(context.node_config["data-root"])
    pid = int(config["partition-id"])
    if pid != _partition_id(context):
        raise ValueError(f"server asked for partition {pid}, this node holds {_partition_id(context)}")
    if "num-threads" in context.node_config:
        torch.set_num_threads(int(context.node_config["num-threads"]))
    x, y = client_tensors(cfg, pid)
    model = arrays_to_model(initial_model(cfg), msg.content["arrays"])
    loss = train_local(model, x, y, cfg.local, seed=int(config["seed"]))
    metrics = MetricRecord({"num-examples": len(y), "train_loss": loss})
    return Message(RecordDict({"arrays": model_to_arrays(model), "metrics": metrics}), reply_to=msg)
