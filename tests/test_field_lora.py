"""The field's federated LoRA methods and FedMUD's decompositions as adapters: the defining property of
each method's round, checked through the method's own hooks on a 2-layer MiniLM (what the ServerApp and
the ClientApps call), and that a few local steps of every method lower a client's training loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import SMALL, TINY_TEXT, built, metrics_rows
from fedlora.aggregate import Update, stacked_factors, weights
from fedlora.config import compose, resolve
from fedlora.errors import ConfigError
from fedlora.federated_data import client_tensors
from fedlora.ledger import serialized_bytes
from fedlora.methods import METHODS
from fedlora.parametrizations.adapters import at_rank
from fedlora.parametrizations.base import delta_layers
from fedlora.state import state_tensors
from fedlora.training import evaluate, train_local

EXAMPLES = [50, 30, 20]  # the clients' example counts: shares 0.5, 0.3, 0.2


def config(*overrides: str):
    return resolve(compose(TINY_TEXT + list(overrides)))


def effective(model) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight as the model computes with it, W + s ΔW."""
    with torch.no_grad():
        return {name: layer.full_weight().double().clone() for name, layer in delta_layers(model)}


def play_round(method, server, server_round: int, scale: float = 0.05, seed: int = 0):
    """One round as the strategy and the clients play it, local training replaced by a random step of
    every parameter that trains: the clients' updates and their models' effective weights."""
    method.start_round(server, server_round)
    down = state_tensors(server, method.down_keys(server, server_round))
    updates, models = [], []
    for k, n in enumerate(EXAMPLES):
        client = method.load(method.initial_model(), down, server_round, required=down)
        method.set_trainable(client, server_round)
        g = torch.Generator().manual_seed(1000 * seed + k)
        with torch.no_grad():
            for p in client.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * scale)
        up = state_tensors(client, method.up_keys(client, server_round))
        updates.append(Update({key: v.numpy() for key, v in up.items()}, n))
        models.append(effective(client))
    return updates, models


def mean_model(models):
    shares = [n / sum(EXAMPLES) for n in EXAMPLES]
    return {name: sum(s * m[name] for s, m in zip(shares, models)) for name in models[0]}


def gap(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


EXACT = ["fedex_lora-lora", "fedex_lora-lora_nonzero", "flora-lora", "flora-lora_nonzero", "rolora-lora",
         "aad_lora-aad_lora", "aad_lora-kron_aad", "aad_lora_mud-aad_lora", "ffa_lora-lora", "fed_sb-lora_sb"]


@pytest.mark.parametrize("preset", EXACT)
def test_the_global_model_is_the_mean_of_the_clients_models_every_round(preset):
    """FedEx-LoRA, FLoRA, RoLoRA (both phases), the aggregation-aware adapters with and without MUD:
    after each round the server's model computes with exactly the example-weighted mean of the
    clients' weights, and so does a client that receives the next round's model."""
    method_name, adapter = preset.split("-")
    method, server = built(config(f"method={method_name}", f"adapter={adapter}"))
    for server_round in (1, 2):
        updates, models = play_round(method, server, server_round, seed=server_round)
        method.aggregate(server, updates)
        target = mean_model(models)
        assert gap(effective(server), target) < 1e-5
        assert gap(models[0], target) > 1e-3  # the clients did differ
    # the next round's clients start from the global model (after FLoRA's and MUD's fold and redraw)
    method.start_round(server, 3)
    down = state_tensors(server, method.down_keys(server, 3))
    fresh = method.load(method.initial_model(), down, 3, required=down)
    assert gap(effective(fresh), effective(server)) < 1e-5
    assert gap(effective(fresh), target) < 1e-5


def test_fedit_and_kronecker_blocks_averaged_as_fedit_are_not_exact():
    """The baseline the exact methods are measured against: averaging both factors is biased."""
    for adapter in ("lora", "kron"):
        method, server = built(config("method=fedit", f"adapter={adapter}"))
        updates, models = play_round(method, server, 1, scale=0.5)
        method.aggregate(server, updates)
        assert gap(effective(server), mean_model(models)) > 1e-4


def test_flora_stacks_any_ranks_into_the_exact_mean_product():
    g = np.random.default_rng(0)
    ranks, shares = [2, 4, 8], [0.5, 0.3, 0.2]
    bs = [g.standard_normal((20, r)) for r in ranks]
    as_ = [g.standard_normal((r, 12)) for r in ranks]
    b, a = stacked_factors(bs, as_, shares)
    assert b.shape == (20, 14) and a.shape == (14, 12)
    np.testing.assert_allclose(b @ a, sum(s * b_k @ a_k for s, b_k, a_k in zip(shares, bs, as_)), atol=1e-12)


def test_flora_and_mud_clients_start_every_round_from_a_fresh_adapter_but_not_fedex():
    for method_name, adapter, fresh in (("flora", "lora", True), ("aad_lora_mud", "aad_lora", True),
                                        ("fedex_lora", "lora", False)):
        method, server = built(config(f"method={method_name}", f"adapter={adapter}"))
        updates, _ = play_round(method, server, 1)
        method.aggregate(server, updates)
        method.start_round(server, 2)
        sent = set(method.down_keys(server, 2))
        weights_sent = {f"{name}.weight" for name, _ in delta_layers(server)}
        assert weights_sent <= sent  # the frozen weights changed: they travel
        assert (not any(".delta." in k for k in sent)) == fresh


def test_rolora_alternates_and_sends_half_of_fedits_adapter():
    method, model = built(config("method=rolora", "adapter=lora"))
    fedit, fedit_model = built(config("method=fedit", "adapter=lora"))
    for server_round, sent, kept in ((1, "lora_B", "lora_A"), (2, "lora_A", "lora_B"), (3, "lora_B", "lora_A")):
        up = method.up_keys(model, server_round)
        assert any(k.endswith(sent) for k in up) and not any(k.endswith(kept) for k in up)
        method.set_trainable(model, server_round)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trained == set(up)
    adapter = lambda keys, m: sum(v.numel() for k, v in state_tensors(m, keys).items() if ".delta." in k)
    assert adapter(method.up_keys(model, 1), model) * 2 == adapter(fedit.up_keys(fedit_model, 1), fedit_model)


def test_aad_lora_trains_lora_s_numbers_and_its_update_reaches_rank_2r():
    method, model = built(config("method=aad_lora"))
    lora_method, lora_model = built(config("method=fedit", "adapter=lora"))
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and ".delta." in n)
    assert count(model) == count(lora_model)
    updates, _ = play_round(method, model, 1)
    method.aggregate(model, updates)
    r = method.adapter.r
    for _, layer in delta_layers(model):
        assert torch.linalg.matrix_rank(layer.delta.matrix().detach()) == 2 * r
    ffa, ffa_model = built(config("method=ffa_lora", "adapter=lora"))
    updates, _ = play_round(ffa, ffa_model, 1)
    ffa.aggregate(ffa_model, updates)
    for _, layer in delta_layers(ffa_model):
        assert torch.linalg.matrix_rank(layer.delta.matrix().detach()) == r


@pytest.mark.parametrize("overrides, message", [
    (["method=aad_lora", "adapter=lora"], "adapter=lora is not one of them: use adapter=aad_lora or kron_aad"),
    (["method=ffa_lora", "adapter=aad_lora"], "trains only the adapter's B"),
    (["method=flora", "adapter=bora"], "stacks LoRA's factors"),
    (["method=rolora", "adapter=lora", "method.first=C"], "method.first must be A or B"),
    (["method=fedsa_lora", "eval.clients=false"], "only the clients can evaluate the models it trains"),
])
def test_a_method_refuses_what_its_math_does_not_take(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def loss_on(model, x, y) -> float:
    return evaluate(model, x, y, batch_size=len(y))[1]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_few_local_steps_of_every_method_lower_a_clients_training_loss(name):
    """Each method's preset as a client trains it in round 1: eight optimiser steps (`local.steps`) on
    32 of its examples lower its loss on them."""
    overrides = (TINY_TEXT if METHODS[name].needs_adapter else SMALL) + [f"method={name}", "local.steps=8",
                                                                         "local.batch_size=32"]
    if METHODS[name].needs_adapter and compose(overrides).adapter is None:  # the method's preset chose none
        overrides.append("adapter=lora")
    cfg = resolve(compose(overrides))
    method, server = built(cfg)
    method.start_round(server, 1)
    down = state_tensors(server, method.down_keys(server, 1))
    model = method.load(method.initial_model(), down, 1, required=down)
    method.set_trainable(model, 1)
    x, y = client_tensors(cfg, 0)
    x, y = x[:32], y[:32]
    before = loss_on(model, x, y)
    train_local(model, x, y, cfg.local, seed=1)
    assert loss_on(model, x, y) < before - 0.01, f"{name}: {before:.4f} -> {loss_on(model, x, y):.4f}"


# --- short real runs: what travels each way is what the method says ---------------------------------

NEW_PRESETS = ["flora-lora", "fedex_lora-lora_nonzero", "rolora-lora", "aad_lora", "aad_lora_mud-kron_aad",
               "fedit-kron"]


def arrays_bytes(model, keys) -> int:
    return sum(serialized_bytes(t) for t in state_tensors(model, keys).values())


@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_a_short_run_sends_what_the_method_says_each_way(preset, preset_run):
    cfg, run_dir = preset_run(preset)
    rows = metrics_rows(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert [r["round"] for r in rows] == [1, 2]
    method, model = built(cfg)
    for row in rows:
        r, k = row["round"], cfg.clients_per_round
        assert row["num_clients"] == k and row["rejected"] == 0
        assert row["bytes_up"] == k * arrays_bytes(model, method.up_keys(model, r))
        assert row["bytes_down"] == k * arrays_bytes(model, method.down_keys(model, r))
        assert row["train_loss"] > 0 and 0 <= row["test_accuracy"] <= 1
    weights = arrays_bytes(model, [f"{name}.weight" for name, _ in delta_layers(model)])
    folds = preset.split("-")[0] in ("flora", "fedex_lora", "aad_lora_mud")
    assert (rows[0]["bytes_down"] >= cfg.clients_per_round * weights) == folds  # the frozen weights travel
    export = run_dir / "adapter"
    # PEFT's LoRA over the pretrained weights only where they were not changed
    assert (export / "adapter_config.json").is_file() == (cfg.adapter.name == "lora" and not folds)


# --- heterogeneous ranks -----------------------------------------------------------------------------

RANKS = ["adapter=lora", "adapter.ranks=[2,4,8]"]


def play_heterogeneous_round(method, server, server_round: int, ranks: list[int]):
    """play_round with clients of the given ranks, each sent the global arrays at its rank."""
    method.start_round(server, server_round)
    down = state_tensors(server, method.down_keys(server, server_round))
    updates, models = [], []
    for k, (n, rank) in enumerate(zip(EXAMPLES, ranks)):
        client = method.initial_model(rank)
        method.load(client, at_rank(down, rank), server_round, required=down)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in client.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        up = state_tensors(client, method.up_keys(client, server_round))
        assert all(v.shape[-1 if key.endswith("lora_B") else 0] == rank for key, v in up.items() if ".lora_" in key)
        updates.append(Update({key: v.numpy() for key, v in up.items()}, n))
        models.append(effective(client))
    return updates, models


def test_heterogeneous_ranks_give_each_client_its_own_shapes_in_seeded_tiers():
    method, server = built(config("method=flora", *RANKS, "num_clients=6"))
    tiers = [method.rank_of(pid) for pid in range(6)]
    assert sorted(tiers) == [2, 2, 4, 4, 8, 8]  # dealt evenly
    again, _ = built(config("method=flora", *RANKS, "num_clients=6"))
    assert [again.rank_of(pid) for pid in range(6)] == tiers  # seeded
    for rank in (2, 4, 8):
        client = method.initial_model(rank)
        for _, layer in delta_layers(client):
            assert layer.delta.lora_A.shape[0] == layer.delta.lora_B.shape[1] == rank
            assert layer.scaling == method.adapter.alpha / method.adapter.r  # one scale for every rank


def test_flora_with_heterogeneous_ranks_is_exact():
    method, server = built(config("method=flora", *RANKS))
    updates, models = play_heterogeneous_round(method, server, 1, [2, 4, 8])
    method.aggregate(server, updates)
    assert gap(effective(server), mean_model(models)) < 1e-5


def test_flexlora_with_heterogeneous_ranks_keeps_the_best_rank_r_approximation_of_the_padded_mean():
    method, server = built(config("method=flexlora", *RANKS))
    updates, _ = play_heterogeneous_round(method, server, 1, [2, 4, 8])
    ideal = {name: sum(s * u.arrays[f"{name}.delta.lora_B"].astype(np.float64) @ u.arrays[f"{name}.delta.lora_A"]
                       for s, u in zip(weights(updates), updates)) for name, _ in delta_layers(server)}
    method.aggregate(server, updates)
    for name, layer in delta_layers(server):
        u, s, vh = np.linalg.svd(ideal[name])
        best = (u[:, :8] * s[:8]) @ vh[:8]
        np.testing.assert_allclose(layer.delta.matrix().detach().double().numpy(), best, atol=1e-5)


def test_zero_padding_with_equal_ranks_is_fedit_and_pads_lower_ranks():
    zero, zero_model = built(config("method=zero_pad", "adapter=lora"))
    fedit, fedit_model = built(config("method=fedit", "adapter=lora"))
    updates, _ = play_round(zero, zero_model, 1)
    zero.aggregate(zero_model, updates)
    fedit.aggregate(fedit_model, updates)
    for key, value in state_tensors(fedit_model, fedit.global_keys(fedit_model)).items():
        assert torch.equal(value, state_tensors(zero_model, [key])[key])
    method, server = built(config("method=zero_pad", *RANKS))
    updates, _ = play_heterogeneous_round(method, server, 1, [2, 4, 8])
    method.aggregate(server, updates)
    shares = weights(updates)
    for name, layer in delta_layers(server):
        b = layer.delta.lora_B.detach().numpy()
        np.testing.assert_allclose(b[:, 5], shares[2] * updates[2].arrays[f"{name}.delta.lora_B"][:, 5], atol=1e-6)


def test_a_method_of_one_rank_refuses_heterogeneous_ranks_and_names_those_that_take_them():
    with pytest.raises(ConfigError, match="method=fedit averages adapters of one rank: use method=flexlora, flora, "
                                          "zero_pad"):
        config("method=fedit", *RANKS)
    with pytest.raises(ConfigError, match="adapter.ranks must list ranks between 1 and adapter.r=8"):
        config("method=flora", "adapter=lora", "adapter.ranks=[4,16]")
    for method in ("flexlora", "zero_pad"):  # a lower rank cannot take the global initial product out of W
        with pytest.raises(ConfigError, match="adapter.ranks with adapter.subtract_initial=true"):
            config(f"method={method}", "adapter=lora_nonzero", "adapter.ranks=[4,8]")


@pytest.mark.parametrize("preset", ["flora-ranks", "flexlora-ranks", "zero_pad-ranks"])
def test_a_short_run_with_heterogeneous_ranks_checks_each_client_at_its_own_shapes(preset, preset_run):
    from strategies.strategy import sample

    cfg, run_dir = preset_run(preset)
    rows = metrics_rows(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    method, server = built(cfg)
    for row in rows:
        r = row["round"]
        assert row["num_clients"] == cfg.clients_per_round and row["rejected"] == 0
        picked = sample(range(cfg.num_clients), cfg.clients_per_round, cfg.seed, r)
        up = state_tensors(server, method.up_keys(server, r))
        down = state_tensors(server, method.down_keys(server, r))
        assert row["bytes_up"] == sum(sum(serialized_bytes(t) for t in at_rank(up, method.rank_of(p)).values())
                                      for p in picked)
        assert row["bytes_down"] == sum(sum(serialized_bytes(t) for t in at_rank(down, method.rank_of(p)).values())
                                        for p in picked)
        if cfg.eval.clients:  # every client evaluated the global model at its own rank
            assert row["clients_evaluated"] == cfg.num_clients and 0 <= row["client_accuracy_worst"] <= 1


# --- the broadcast downlink of FLoRA and FedEx-LoRA ---------------------------------------------------

def test_fedex_lora_sends_its_residual_as_a_rank_q_svd_and_says_how_far_that_is_from_exact():
    """Under method.residual_rank=q the server folds the rank-q truncated SVD of the residual
    R = Σ p_k B_k A_k − B̄ Ā instead of R: the global model then differs from the exact mean by
    s (R − R_q), and the round's figures give ‖R − R_q‖ / ‖R‖ as the SVD's tail says; a q at least
    R's rank (K r + r) is exact again."""
    from fedlora.parametrizations.base import delta_key

    results = {}
    for q in (0, 1, 40):
        overrides = ["method=fedex_lora", "method.downlink=broadcast_update", f"method.residual_rank={q}"]
        method, server = built(config(*overrides))
        updates, _ = play_round(method, server, 1, scale=0.5)
        method.aggregate(server, updates)
        results[q] = method, effective(server)
    method, exact = results[0]
    assert method.round_figures() == {}  # dense: nothing to report
    shares = weights(updates)
    tail = whole = 0.0
    for name, layer in delta_layers(built(config("method=fedex_lora"))[1]):
        b = [u.arrays[delta_key(name, "lora_B")].astype(np.float64) for u in updates]
        a = [u.arrays[delta_key(name, "lora_A")].astype(np.float64) for u in updates]
        residual = (sum(p * b_k @ a_k for p, b_k, a_k in zip(shares, b, a))
                    - sum(p * b_k for p, b_k in zip(shares, b)) @ sum(p * a_k for p, a_k in zip(shares, a)))
        sigma = np.linalg.svd(residual, compute_uv=False)
        assert sigma[1] > 1e-3 * sigma[0]  # more than rank 1: q = 1 loses something
        tail, whole = tail + (sigma[1:] ** 2).sum(), whole + (sigma ** 2).sum()
        lost = (exact[name] - results[1][1][name]).numpy() / layer.scaling  # R − R_1
        np.testing.assert_allclose(np.linalg.svd(lost, compute_uv=False)[:3], sigma[1:4], rtol=1e-3)
    figures = results[1][0].round_figures()
    assert figures["residual_error"] == pytest.approx(np.sqrt(tail / whole), rel=1e-3)
    assert 0 < figures["update_error"] < figures["residual_error"] < 1
    assert gap(results[40][1], exact) < 1e-5 and results[40][0].round_figures()["residual_error"] < 1e-5


def test_a_run_with_flora_s_broadcast_reaches_the_same_global_model_and_sends_only_stacked_factors(preset_run):
    """FLoRA's paper downlink: every client is sent the head and the round's stacked factors and folds
    them into its replica; at heterogeneous ranks the global model is the one a global downlink
    gives, for a fraction of the downlink bytes."""
    from strategies.strategy import sample

    cfg, run_dir = preset_run("flora-ranks-broadcast")
    rows, sent_w = metrics_rows(run_dir), metrics_rows(preset_run("flora-ranks")[1])
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in sent_w]
    assert [r["train_loss"] for r in rows] == pytest.approx([r["train_loss"] for r in sent_w], rel=1e-5)
    method, server = built(cfg)
    picked = sample(range(cfg.num_clients), cfg.clients_per_round, cfg.seed, 1)
    stacked = sum(method.rank_of(p) for p in picked)
    head = [k for k in method.up_keys(server, 1) if ".lora_" not in k]
    per_client = arrays_bytes(server, head) + sum(
        serialized_bytes(torch.zeros(layer.weight_shape[0], stacked)) + serialized_bytes(torch.zeros(stacked, layer.weight_shape[1]))
        for _, layer in delta_layers(server))
    assert rows[0]["bytes_down"] == cfg.num_clients * per_client  # every client, after round 1
    assert rows[1]["bytes_down"] == 0  # none after the last round; train messages carry no arrays
    assert rows[0]["bytes_down"] < sent_w[0]["bytes_down"] / 5
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in sent_w]


def test_a_run_of_fedex_lora_with_a_rank_2_residual_logs_its_error_and_sends_2_m_plus_n_a_layer(preset_run):
    cfg, run_dir = preset_run("fedex_lora-residual2")
    rows = metrics_rows(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    method, server = built(cfg)
    residual = sum(serialized_bytes(torch.zeros(layer.weight_shape[0], 2)) + serialized_bytes(torch.zeros(2, layer.weight_shape[1]))
                   for _, layer in delta_layers(server))
    assert rows[0]["bytes_down"] == cfg.num_clients * (arrays_bytes(server, method.up_keys(server, 1)) + residual)
    assert rows[1]["bytes_down"] == 0
    for row in rows:
        assert 0 < row["update_error"] <= row["residual_error"] <= 1


# --- FedSA-LoRA and per-client evaluation ------------------------------------------------------------


def test_a_clients_held_out_examples_are_seeded_disjoint_and_counted_by_the_server():
    from fedlora.federated_data import holdout, split_for_clients, train_count

    train, held = holdout(50, 0.2, seed=3, partition_id=1)
    assert len(held) == 10 and len(train) == 40 and not set(train) & set(held)
    assert set(train) | set(held) == set(range(50))
    again = holdout(50, 0.2, seed=3, partition_id=1)
    assert np.array_equal(again[1], held) and not np.array_equal(holdout(50, 0.2, 3, 2)[1], held)
    cfg = config("method=fedsa_lora", "adapter=lora")
    x, y = torch.arange(50).float()[:, None], torch.arange(50)
    (xt, yt), (xe, ye) = split_for_clients(cfg, 1, x, y)
    assert len(yt) == train_count(cfg, 1, 50) == 40 and len(ye) == 10
    (xt, yt), (xe, ye) = split_for_clients(config("method=fedit", "adapter=lora"), 1, x, y)
    assert len(yt) == 50 and len(ye) == 0  # eval.clients off: every example trains


def test_fedsa_lora_never_sends_b_and_each_client_keeps_its_own():
    """Two rounds of one client through the real ClientApp handlers: B is in no message either way,
    the client's B stays in its node state and round 2 starts from it."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients import client_app
    from fedlora.config import to_json
    from fedlora.protocol import CONFIG
    from strategies.strategy import MethodStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = config("method=fedsa_lora", "adapter=lora", "clients_per_round=4", "local.steps=2")
    method, model = built(cfg)
    b_keys = set(method.personal_keys(model))
    assert b_keys and all(k.endswith("lora_B") for k in b_keys)
    assert not b_keys & set(method.up_keys(model, 1)) and not b_keys & set(method.down_keys(model, 1))
    strategy = MethodStrategy(method, model, {pid: 100 + pid for pid in range(4)}, 4, cfg.seed, evaluate_clients=True)
    contexts = {pid: Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid}, state=RecordDict(),
                             run_config={}) for pid in range(4)}
    for context in contexts.values():
        context.state[client_app.RUN_CONFIG] = ConfigRecord({CONFIG: to_json(cfg)})
    kept = {}
    for server_round in (1, 2):
        sent = strategy.configure_train(server_round, strategy.global_arrays(), ConfigRecord(), None)
        replies = []
        for msg in sent:
            assert not b_keys & set(msg.content["arrays"])
            pid = msg.content["config"]["partition-id"]
            reply = client_app.train(msg, contexts[pid])
            assert not b_keys & set(reply.content["arrays"])
            own = contexts[pid].state.array_records[client_app.PERSONAL]
            b = {k: own[k].numpy().copy() for k in b_keys}
            assert all(np.abs(v).sum() > 0 for v in b.values())  # trained from 0
            if server_round == 2:  # it went on from its own B of round 1, not from 0 and not another's
                assert all(not np.array_equal(b[k], kept[pid][k]) for k in b_keys)
                others = [kept[q] for q in kept if q != pid]
                assert all(not np.array_equal(b[k], o[k]) for o in others for k in b_keys)
            kept[pid] = b
            replies.append(Message(reply.content, reply_to=msg))
        arrays, _ = strategy.aggregate_train(server_round, replies)
    evaluations = [Message(client_app.evaluate_client(msg, contexts[msg.content["config"]["partition-id"]]).content,
                           reply_to=msg) for msg in strategy.configure_evaluate(2, arrays, ConfigRecord(), None)]
    scores = strategy.aggregate_evaluate(2, evaluations)
    assert scores["clients_evaluated"] == 4
    assert 0 <= scores["client_accuracy_worst"] <= scores["client_accuracy_mean"] <= 1


def test_a_short_run_of_fedsa_lora_evaluates_every_client_and_the_report_shows_it(preset_run, tmp_path):
    from fedlora.report import make_report

    cfg, run_dir = preset_run("fedsa_lora-lora")
    rows = metrics_rows(run_dir)
    method, model = built(cfg)
    for row in rows:
        assert row["clients_evaluated"] == cfg.num_clients and row["rejected"] == 0
        assert 0 <= row["client_accuracy_worst"] <= row["client_accuracy_mean"] <= 1 and row["client_accuracy_std"] >= 0
        assert row["eval_bytes_down"] == cfg.num_clients * arrays_bytes(model, method.global_keys(model))
        assert row["bytes_up"] == cfg.clients_per_round * arrays_bytes(model, method.up_keys(model, row["round"]))
    _, table = make_report([run_dir], tmp_path)
    assert "worst client" in table and f"{rows[-1]['client_accuracy_worst']:.4f}" in table


# --- Fed-SB ------------------------------------------------------------------------------------------


def test_lora_sb_starts_from_the_best_rank_r_approximation_of_the_update_with_orthonormal_frames():
    from fedlora.parametrizations.adapters import LoRASB

    delta = LoRASB(20, 12, r=3)
    delta.reset(0)
    assert torch.count_nonzero(delta.matrix()) == 0  # before the initialisation: ΔW = 0
    update = torch.randn(20, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta.set_from_update(update, scaling=2.0)
    u, s, vh = torch.linalg.svd(update)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(2.0 * delta.matrix().double(), best, atol=1e-5)
    assert torch.allclose(delta.lora_B.T @ delta.lora_B, torch.eye(3), atol=1e-5)
    assert torch.allclose(delta.lora_A @ delta.lora_A.T, torch.eye(3), atol=1e-5)


def test_fed_sb_initialises_from_the_sign_of_the_summed_gradients_and_sends_r_squared_up():
    method, model = built(config("method=fed_sb"))
    x, y = client_tensors(method.cfg, 0)
    shares = [method.init_update(method.initial_model(), *client_tensors(method.cfg, pid), seed=pid)
              for pid in (0, 1)]
    assert all(n == min(len(client_tensors(method.cfg, pid)[1]), 85) for (_, n, _), pid in zip(shares, (0, 1)))
    updates = [Update({k: v.numpy() for k, v in g.items()}, n) for g, n, _ in shares]
    method.initialise(model, updates)
    r = method.adapter.r
    for name, layer in delta_layers(model):
        g = sum(u.arrays[f"{name}.weight"].astype(np.float64) for u in updates)
        u_, s, vh = np.linalg.svd(-method.config.init_lr * np.sign(g))
        np.testing.assert_allclose(layer.scaled_delta().detach().double().numpy(), (u_[:, :r] * s[:r]) @ vh[:r],
                                   atol=1e-7)
        assert layer.weight.requires_grad is False  # the gradient pass left the model as it was
    up = state_tensors(model, method.up_keys(model, 1))
    adapter = {k: v for k, v in up.items() if ".delta." in k}
    assert all(k.endswith("lora_R") and v.shape == (r, r) for k, v in adapter.items())
    assert len(adapter) == len(delta_layers(model))


def test_a_short_run_of_fed_sb_sends_the_frames_once_and_r_squared_each_round(preset_run):
    from strategies.strategy import sample

    cfg, run_dir = preset_run("fed_sb")
    rows = metrics_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    init = summary["initialisation"]
    method, model = built(cfg)
    weights_bytes = arrays_bytes(model, method.init_keys(model))
    assert init["clients"] == cfg.clients_per_round and init["bytes_up"] == cfg.clients_per_round * weights_bytes
    assert rows[0]["cum_bytes_up"] == init["bytes_up"] + rows[0]["bytes_up"]  # the dense gradients count
    full = arrays_bytes(model, method.down_keys(model, 1))
    frames = arrays_bytes(model, method.fixed_keys(model))
    seen = set()
    for row in rows:
        picked = sample(range(cfg.num_clients), cfg.clients_per_round, cfg.seed, row["round"])
        assert row["bytes_up"] == len(picked) * arrays_bytes(model, method.up_keys(model, row["round"]))
        assert row["bytes_down"] == sum(full - frames if p in seen else full for p in picked)
        assert row["rejected"] == 0
        seen |= set(picked)


def test_a_fed_sb_node_that_lost_its_frames_says_so_and_is_sent_them_again():
    from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from clients import client_app
    from fedlora.config import to_json
    from fedlora.protocol import CONFIG
    from strategies.strategy import MethodStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = config("method=fed_sb", "clients_per_round=4", "local.steps=1")
    method, model = built(cfg)
    frames = set(method.fixed_keys(model))
    strategy = MethodStrategy(method, model, {pid: 100 + pid for pid in range(4)}, 4, cfg.seed)
    contexts = {pid: Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid}, state=RecordDict(),
                             run_config={}) for pid in range(4)}
    for context in contexts.values():
        context.state[client_app.RUN_CONFIG] = ConfigRecord({CONFIG: to_json(cfg)})

    def play(server_round):
        sent = strategy.configure_train(server_round, strategy.global_arrays(), ConfigRecord(), None)
        replies = []
        for msg in sent:
            try:
                reply = client_app.train(msg, contexts[msg.content["config"]["partition-id"]])
                replies.append(Message(reply.content, reply_to=msg))
            except ValueError as e:
                replies.append(Message(Error(code=0, reason=str(e)), reply_to=msg))
        _, metrics = strategy.aggregate_train(server_round, replies)
        return {m.content["config"]["partition-id"]: frames <= set(m.content["arrays"]) for m in sent}, metrics

    carried, metrics = play(1)
    assert all(carried.values()) and metrics["rejected"] == 0
    del contexts[0].state[client_app.FIXED]  # node 0 restarted (its config kept, to isolate the frames)
    carried, metrics = play(2)
    assert not any(carried.values()) and metrics["rejected"] == 1  # node 0 could not train
    carried, metrics = play(3)
    assert carried == {0: True, 1: False, 2: False, 3: False} and metrics["rejected"] == 0
