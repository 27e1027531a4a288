"""The server side on real Flower messages (FedAvg): the bytes of each message, reply validation,
aggregation, sampling."""

import io
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from conftest import built
from fedlora.config import compose, resolve
from fedlora.errors import FedloraError
from fedlora.protocol import PARTITION
from strategies.grid import message_bytes
from strategies.strategy import MethodStrategy
from strategies.validation import ReplyRejected, parse_train_reply, tensor_spec


@pytest.fixture(autouse=True)
def server_identity():
    # What a ServerApp process has set before it builds messages.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture(scope="module")
def cfg():
    return resolve(compose(["num_clients=6", "clients_per_round=3"]))


def make_strategy(cfg, sizes=None):
    method, model = built(cfg)
    return MethodStrategy(method, model, {pid: 100 + pid for pid in range(cfg.num_clients)}, cfg.clients_per_round,
                          cfg.seed, sizes)


@pytest.fixture
def strategy(cfg):
    return make_strategy(cfg)


@pytest.fixture(scope="module")
def arrays(cfg):
    return make_strategy(cfg).global_arrays()


def array_spec(arrays):
    return tensor_spec({k: torch.from_numpy(a.numpy()) for k, a in arrays.items()})


def npy_size(a: np.ndarray) -> int:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return len(buf.getvalue())


def reply_to(msg, arrays: dict, n=100, loss=0.5):
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train_loss": loss})})
    return Message(content, reply_to=msg)


def test_each_message_carries_the_bytes_of_the_arrays_sent(strategy, arrays, cfg):
    _, model = built(cfg)
    tensors = [v for v in model.state_dict().values() if v.is_floating_point()]
    per_client = sum(npy_size(t.numpy()) for t in tensors)
    # float32 payload plus numpy's 128-byte header per array
    assert per_client == sum(t.numel() * 4 + 128 for t in tensors)
    messages = list(strategy.configure_train(1, arrays, None, None))
    assert len(messages) == cfg.clients_per_round
    assert [message_bytes(m) for m in messages] == [per_client] * cfg.clients_per_round
    replies = [reply_to(m, {k: a.numpy() for k, a in arrays.items()}) for m in messages]
    assert [message_bytes(r) for r in replies] == [per_client] * cfg.clients_per_round
    assert message_bytes(Message(Error(code=0, reason="crashed"), reply_to=messages[0])) == 0


def test_each_client_gets_its_own_content(strategy, arrays):
    messages = list(strategy.configure_train(1, arrays, None, None))
    contents = [m.content for m in messages]
    assert len({id(c) for c in contents}) == len(contents)
    assert len({id(c["config"]) for c in contents}) == len(contents)
    assert sorted(c["config"]["partition-id"] for c in contents) == strategy.sample(1)
    assert len({c["config"]["seed"] for c in contents}) == len(contents)
    # the run's config reached the nodes once, in the query that opened the run: not in train messages
    assert set(contents[0]["config"]) == {"round", "partition-id", "seed"}
    assert [m.metadata.dst_node_id for m in messages] == [100 + pid for pid in strategy.sample(1)]


def test_sampling_is_seeded_by_run_seed_and_round(strategy, cfg):
    assert strategy.sample(3) == strategy.sample(3)
    assert len({tuple(strategy.sample(r)) for r in range(1, 20)}) > 1
    other = make_strategy(resolve(compose(["num_clients=6", "clients_per_round=3", "seed=5"])))
    assert [other.sample(r) for r in range(1, 10)] != [strategy.sample(r) for r in range(1, 10)]


def test_aggregate_is_the_example_weighted_mean_in_any_reply_order(strategy, arrays):
    messages = list(strategy.configure_train(1, arrays, None, None))
    rng = np.random.default_rng(0)
    spec = array_spec(arrays)
    locals_ = [{k: rng.standard_normal(s).astype(d) for k, (s, d) in spec.items()} for _ in messages]
    sizes = [10, 30, 60]
    replies = [reply_to(m, a, n) for m, a, n in zip(messages, locals_, sizes)]
    agg, metrics = strategy.aggregate_train(1, replies)
    key = "classifier.weight"
    expected = sum(a[key].astype(np.float64) * n for a, n in zip(locals_, sizes)) / sum(sizes)
    np.testing.assert_allclose(agg[key].numpy(), expected, rtol=1e-6)
    assert metrics["num-examples"] == 100
    strategy.configure_train(1, arrays, None, None)
    agg2, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert all(np.array_equal(agg[k].numpy(), agg2[k].numpy()) for k in spec)


def corrupt(kind, arrays):
    a = {k: v.numpy().copy() for k, v in arrays.items()}
    if kind == "missing":
        a.pop("classifier.bias")
    elif kind == "extra":
        a["evil"] = np.zeros(3, np.float32)
    elif kind == "shape":
        a["classifier.bias"] = np.zeros(11, np.float32)
    elif kind == "dtype":
        a["classifier.bias"] = a["classifier.bias"].astype(np.float64)
    elif kind == "nan":
        a["classifier.weight"][0, 0] = np.nan
    elif kind == "inf":
        a["features.0.weight"][0, 0, 0, 0] = np.inf
    return a


@pytest.mark.parametrize("kind, reason", [
    ("missing", "missing arrays"), ("extra", "unexpected arrays"), ("shape", r"is \(11,\) float32, expected \(10,\)"),
    ("dtype", "float64"), ("nan", "non-finite"), ("inf", "non-finite")])
def test_bad_replies_are_rejected_with_a_reason(kind, reason, arrays):
    bad = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in corrupt(kind, arrays).items()}),
                      "metrics": MetricRecord({"num-examples": 5, "train_loss": 0.1})})
    with pytest.raises(ReplyRejected, match=reason):
        parse_train_reply(bad, array_spec(arrays))


@pytest.mark.parametrize("metrics, reason", [
    (None, "no MetricRecord"), ({"train_loss": 0.1}, "num-examples"), ({"num-examples": 0, "train_loss": 0.1}, "num-examples"),
    ({"num-examples": 5, "train_loss": float("nan")}, "train_loss")])
def test_bad_metrics_are_rejected(metrics, reason, arrays):
    content = RecordDict({"arrays": ArrayRecord(dict(arrays.items()))})
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    with pytest.raises(ReplyRejected, match=reason):
        parse_train_reply(content, array_spec(arrays))


def test_rejected_replies_stay_out_of_the_aggregate(strategy, arrays, caplog):
    messages = list(strategy.configure_train(1, arrays, None, None))
    good = {k: np.full(a.shape, 1.0, a.dtype) for k, a in ((k, v.numpy()) for k, v in arrays.items())}
    replies = [reply_to(messages[0], good, 10),
               reply_to(messages[1], corrupt("nan", arrays), 1000),
               Message(Error(code=0, reason="client crashed"), reply_to=messages[2])]
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        agg, metrics = strategy.aggregate_train(1, replies)
    assert all(np.all(agg[k].numpy() == 1.0) for k in good)
    assert metrics["num-examples"] == 10
    assert metrics["num-clients"] == 1 and metrics["rejected"] == 2
    text = caplog.text
    assert "non-finite" in text and "client crashed" in text


def test_replies_must_come_from_this_rounds_clients_once_with_their_own_size(cfg, arrays, caplog):
    sizes = {pid: 50 + pid for pid in range(cfg.num_clients)}
    strategy = make_strategy(cfg, sizes)
    messages = list(strategy.configure_train(1, arrays, None, None))
    pids = [int(m.content["config"][PARTITION]) for m in messages]
    assert sorted(pids) == sorted(strategy.sample(1))
    # the largest first: a simulation hands them to its actors in this order
    assert [sizes[p] for p in pids] == sorted((sizes[p] for p in pids), reverse=True)
    values = {k: a.numpy() for k, a in arrays.items()}
    outsider = next(p for p in range(cfg.num_clients) if p not in pids)
    stranger = Message(RecordDict(), dst_node_id=100 + outsider, message_type="train")
    replies = [reply_to(messages[0], values, sizes[pids[0]]),
               reply_to(messages[0], values, sizes[pids[0]]),           # twice
               reply_to(messages[1], values, 10 * sizes[pids[1]]),      # inflated weight
               reply_to(stranger, values, sizes[outsider])]             # not sampled
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-examples"] == sizes[pids[0]] and metrics["rejected"] == 3
    assert "second reply" in caplog.text and "claims" in caplog.text and "not sampled" in caplog.text


def test_a_round_where_every_client_fails_ends_the_run(strategy, arrays):
    messages = list(strategy.configure_train(1, arrays, None, None))
    errors = [Message(Error(code=0, reason="no data here"), reply_to=m) for m in messages]
    with pytest.raises(FedloraError, match="every client failed.*no data here"):
        strategy.aggregate_train(1, errors)


def test_no_valid_reply_keeps_the_model(strategy, arrays):
    messages = list(strategy.configure_train(1, arrays, None, None))
    agg, metrics = strategy.aggregate_train(1, [reply_to(messages[0], corrupt("missing", arrays))])
    assert all(np.array_equal(agg[k].numpy(), arrays[k].numpy()) for k in arrays)
    assert metrics["num-clients"] == 0 and metrics["rejected"] == 1 and np.isnan(metrics["train_loss"])


def test_derived_seeds_differ_by_every_part():
    from fedlora.seeds import derive_seed

    seeds = {derive_seed(0, "frozen-factor-a", 1), derive_seed(0, "frozen-factor-b", 1),
             derive_seed(1, "frozen-factor-a", 1), derive_seed(0, "frozen-factor-a", 2)}
    assert len(seeds) == 4
    assert derive_seed(3, "train", 5, 7) == derive_seed(3, "train", 5, 7)


def test_a_node_that_lost_the_runs_config_is_sent_it_with_its_next_train_message(cfg, arrays):
    from fedlora.config import to_json
    from fedlora.protocol import CONFIG, NO_CONFIG

    method, model = built(cfg)
    strategy = MethodStrategy(method, model, {pid: 100 + pid for pid in range(cfg.num_clients)}, cfg.clients_per_round,
                              cfg.seed, config_json=to_json(cfg))
    messages = list(strategy.configure_train(1, arrays, None, None))
    assert not any(CONFIG in m.content["config"] for m in messages)
    lost = messages[0].content["config"]["partition-id"]
    replies = [Message(Error(code=0, reason=f"ValueError: this node {NO_CONFIG}: ..."), reply_to=messages[0])]
    replies += [reply_to(m, {k: a.numpy() for k, a in arrays.items()}) for m in messages[1:]]
    strategy.aggregate_train(1, replies)
    later = next(r for r in range(2, 50) if lost in strategy.sample(r))
    for r in range(2, later + 1):
        for m in strategy.configure_train(r, arrays, None, None):
            again = m.content["config"]["partition-id"] == lost and r == later
            assert (CONFIG in m.content["config"]) == again
            if again:
                assert m.content["config"][CONFIG] == to_json(cfg)


def test_too_few_valid_replies_keep_the_model_and_a_retry_asks_clients_not_asked_yet(cfg, arrays):
    method, model = built(cfg)
    strategy = MethodStrategy(method, model, {pid: 100 + pid for pid in range(cfg.num_clients)}, cfg.clients_per_round,
                              cfg.seed, min_replies=2)
    values = {k: np.full(a.shape, 1.0, a.dtype) for k, a in ((k, v.numpy()) for k, v in arrays.items())}
    messages = list(strategy.configure_train(1, arrays, None, None))
    # one valid reply, one failure, one that never comes
    assert strategy.accept(1, [reply_to(messages[0], values), Message(Error(code=0, reason="gone"),
                                                                       reply_to=messages[1])]) == 1
    first = list(strategy.sampled)
    retry = strategy.configure_retry(1)
    asked = sorted(m.content["config"]["partition-id"] for m in retry)
    assert len(asked) == 3 and not set(asked) & set(first)  # newly sampled: the other three
    agg, metrics = strategy.finish_train(1)  # the retry's replies did not come either
    assert all(np.array_equal(agg[k].numpy(), arrays[k].numpy()) for k in arrays)  # kept: 1 < min_replies
    assert (metrics["num-clients"], metrics["rejected"], metrics["failed"], metrics["timed-out"]) == (0, 1, 1, 4)
    messages = list(strategy.configure_train(2, arrays, None, None))
    assert strategy.accept(2, [reply_to(m, values) for m in messages[:2]]) == 2
    agg, metrics = strategy.finish_train(2)
    assert metrics["num-clients"] == 2 and all(np.all(agg[k].numpy() == 1.0) for k in values)


def test_a_client_whose_replies_are_always_bad_is_named(strategy, arrays):
    bad = None
    for server_round in range(1, 6):
        messages = list(strategy.configure_train(server_round, arrays, None, None))
        pids = [m.content["config"]["partition-id"] for m in messages]
        bad = pids[0] if bad is None else bad
        replies = [reply_to(m, corrupt("nan", arrays) if pid == bad else {k: a.numpy() for k, a in arrays.items()})
                   for m, pid in zip(messages, pids)]
        strategy.aggregate_train(server_round, replies)
    named = strategy.never_accepted()
    assert list(named) == [bad] and named[bad]["rejected"] >= 1 and "non-finite" in named[bad]["last"]


def test_the_clients_told_to_fail_or_straggle_are_seeded_fractions_of_the_round(arrays):
    cfg = resolve(compose(["num_clients=20", "clients_per_round=10"]))
    method, model = built(cfg)
    strategy = MethodStrategy(method, model, {pid: 100 + pid for pid in range(20)}, 10, cfg.seed,
                              faults={"fail_rate": 0.3, "straggle_rate": 0.1})
    told = []
    for server_round in (1, 2):
        faults = [m.content["config"].get("fault") for m in strategy.configure_train(server_round, arrays, None, None)]
        assert faults.count("fail") == 3 and faults.count("straggle") == 1 and faults.count(None) == 6
        told.append(faults)
    assert told[0] != told[1]  # other clients each round
    again = MethodStrategy(method, model, {pid: 100 + pid for pid in range(20)}, 10, cfg.seed,
                           faults={"fail_rate": 0.3, "straggle_rate": 0.1})
    assert [m.content["config"].get("fault") for m in again.configure_train(1, arrays, None, None)] == told[0]
