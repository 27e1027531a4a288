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
         "aad_lora-aad_lora", "aad_lora-kron_aad", "aad_lora_mud-aad_lora", "ffa_lora-lora"]


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
    base = SMALL if not METHODS[name].needs_adapter else TINY_TEXT
    cfg = resolve(compose(base + [f"method={name}", "local.steps=8", "local.batch_size=32"]
                          + (["adapter=lora"] if METHODS[name].needs_adapter and name not in ("aad_lora", "aad_lora_mud") else [])))
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
