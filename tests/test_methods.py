"""Every FedMUD and baseline method preset, run for 2 rounds on a small subset: the bytes of every
message each way are what the method says travels; and the server's view of the global model."""

import json

import numpy as np
import pytest
import torch

from conftest import built, metrics_rows
from fedlora.config import compose, resolve
from fedlora.ledger import serialized_bytes
from fedlora.parametrizations.base import delta_layers
from fedlora.state import load_arrays, state_tensors

METHODS = ["fedmud", "fedmud_bkd", "fedmud_aad", "fedmud_bkd_aad", "fedlmt", "fedpara"]


def nbytes(tensors):
    return sum(serialized_bytes(t) for t in tensors.values())


@pytest.mark.parametrize("method", METHODS)
def test_each_method_sends_what_it_says(method, preset_run):
    cfg, run_dir = preset_run(method)
    rows = metrics_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2]
    c = summary["compression"]
    assert c["within_5_percent"] and c["target"] == 0.03125
    m, model = built(cfg)
    for r, row in enumerate(rows, start=1):
        assert row["num_clients"] == 2 and row["rejected"] == 0
        assert row["bytes_up"] == 2 * c["uplink_bytes_per_client"]  # only what clients trained, plus BN statistics
        assert row["bytes_down"] == 2 * nbytes(state_tensors(model, m.down_keys(model, r)))
        assert row["train_loss"] > 0 and 0 <= row["test_accuracy"] <= 1
    assert rows[-1]["test_accuracy"] != summary["initial_accuracy"]  # the global model moved
    if method.startswith("fedmud"):  # FedMUD sends the dense weights down, the compressed factors up
        assert rows[0]["bytes_down"] > 20 * rows[0]["bytes_up"]
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert not set(m.down_keys(model, 1)) & {k for k in trained if ".delta." in k}  # redrawn, not sent
    else:  # FedLMT and FedPara send the factorized model both ways
        assert rows[0]["bytes_down"] == rows[0]["bytes_up"]


def test_a_round_that_does_not_redraw_sends_the_factors_down(preset_run):
    cfg, run_dir = preset_run("fedmud_bkd_aad-interval2")
    m, model = built(cfg)
    first, second = metrics_rows(run_dir)
    factors = {k: t for k, t in state_tensors(model, m.up_keys(model, 2)).items() if ".delta." in k}
    assert m.redraws(1) and not m.redraws(2) and m.factor_seed(2) == m.factor_seed(1)
    assert second["bytes_down"] - first["bytes_down"] == 2 * nbytes(factors)


@pytest.mark.parametrize("method", ["fedmud_aad", "fedmud_bkd_aad", "fedmud"])
def test_the_server_evaluates_the_global_model_with_the_rounds_frozen_factors(method):
    """What the ServerApp evaluates (a model rebuilt from the global arrays) is the strategy's own
    global model: the same frozen factors, redrawn with round 1's seed, and the same trained ones."""
    cfg = resolve(compose([f"method={method}"]))
    m, server = built(cfg)
    m.start_round(server, 1)  # redraws with round 1's seed
    rng = np.random.default_rng(0)
    trained = {k: (rng.normal(size=t.shape) * 0.01).astype(np.float32)
               for k, t in state_tensors(server, m.up_keys(server, 1)).items()}
    load_arrays(server, trained)
    _, evaluated = built(cfg)
    m.regenerate(evaluated, 1)
    load_arrays(evaluated, state_tensors(server, m.global_keys(server)), required=m.global_keys(evaluated))
    pairs = list(zip(delta_layers(evaluated), delta_layers(server)))
    assert pairs and all(torch.equal(a.full_weight(), b.full_weight()) for (_, a), (_, b) in pairs)


@pytest.mark.parametrize("method", ["fedmud", "fedmud_bkd_aad"])
def test_broadcast_update_gives_the_same_global_model_as_sending_it(method, preset_run):
    runs = {d: metrics_rows(preset_run(method if d == "global" else f"{method}-broadcast")[1])
            for d in ("global", "broadcast_update")}
    # clients that train from their own replicas reach the same global model as clients sent it
    assert [r["test_accuracy"] for r in runs["broadcast_update"]] == [r["test_accuracy"] for r in runs["global"]]
    assert [r["train_loss"] for r in runs["broadcast_update"]] == pytest.approx(
        [r["train_loss"] for r in runs["global"]], rel=1e-5)
    per_client = json.loads((preset_run(method)[1] / "summary.json").read_text())["compression"]["uplink_bytes_per_client"]
    first, last = runs["broadcast_update"]
    # every one of the 4 clients receives the aggregated update (what clients send up), except after the
    # last round; train messages and acknowledgements carry no arrays
    assert (first["bytes_down"], last["bytes_down"]) == (4 * per_client, 0)
    assert first["bytes_up"] == last["bytes_up"] == 2 * per_client


@pytest.mark.parametrize("preset", [["method=fedmud_bkd_aad"], ["method=aad_lora_mud", "adapter=kron_aad"],
                                    ["method=flora"], ["method=fedex_lora"], ["method=fedex_lora", "method.residual_rank=2"]])
def test_the_replicas_of_every_node_a_process_serves_agree_with_the_server(preset):
    """Under broadcast_update one process serves several nodes with one model: after a round, the
    replica of every node (trained this round or not) is the server's global model as round 2 starts;
    for FedMUD from scratch, for MUD on a pretrained model's adapters, for FLoRA's stacked factors and
    for FedEx-LoRA's residual (dense, or its rank-2 SVD, which server and replicas fold alike)."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients import client_app
    from conftest import SMALL, TINY_TEXT
    from fedlora.config import to_json
    from fedlora.protocol import CONFIG
    from strategies.strategy import MethodStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    base = SMALL if preset[0].startswith("method=fedmud") else TINY_TEXT
    cfg = resolve(compose(base + preset + ["method.downlink=broadcast_update"]))
    method, model = built(cfg)
    strategy = MethodStrategy(method, model, {pid: 100 + pid for pid in range(4)}, 2, cfg.seed)
    contexts = {}
    for pid in range(4):
        contexts[pid] = Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid}, state=RecordDict(),
                                run_config={})
        contexts[pid].state[client_app.RUN_CONFIG] = ConfigRecord({CONFIG: to_json(cfg)})
    sent = strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(), None)
    replies = []
    for msg in sent:  # each client trains in this process, on the one model the process holds
        reply = client_app.train(msg, contexts[msg.content["config"]["partition-id"]])
        replies.append(Message(reply.content, reply_to=msg))
    strategy.aggregate_train(1, replies)
    for msg in strategy.configure_broadcast(1):
        client_app.apply_update(msg, contexts[msg.metadata.dst_node_id - 100])
    method.start_round(model, 2)
    want = state_tensors(model, method.global_keys(model))
    for pid, context in contexts.items():
        replica = context.state.array_records[client_app.REPLICA]
        assert set(replica) == set(want)
        assert all(np.array_equal(replica[k].numpy(), want[k].numpy()) for k in want), pid
