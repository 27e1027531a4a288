"""Client-side DP-SGD: each example's gradient clipped to C, Gaussian noise of σ C on the sum, the
expected batch size as divisor; σ found for a target ε; privacy counted per client by the RDP
accountant; and a short real run under a budget. Central DP (dp.where=server): each update clipped to
C, the uniform mean noised with σ C / m, every round one release; and a short real run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import PRESETS, TINY_TEXT, built, metrics_rows
from fedlora.config import compose, resolve
from fedlora.dp import DPSpec, PrivacyLedger, client_spec, dp_step, epsilon
from fedlora.errors import ConfigError
from fedlora.federated_data import client_tensors
from fedlora.training import mean_loss


def clipped_mean_by_hand(model, x, y, clip, expected):
    """Σ_i clip(∇ℓ_i) / expected, one example at a time with autograd."""
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters() if p.requires_grad}
    for xi, yi in zip(x, y):
        model.zero_grad()
        nn.functional.cross_entropy(model(xi[None]), yi[None]).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        for k in total:
            total[k] += grads[k] * min(1.0, clip / (float(norm) + 1e-6))
    return {k: v / expected for k, v in total.items()}


def test_a_dp_step_is_the_clipped_per_example_sum_over_the_expected_batch_plus_noise_of_sigma_c():
    cfg = resolve(compose(TINY_TEXT + ["method=fedit", "model.max_length=16"]))
    method, model = built(cfg)
    model.eval()  # no dropout: the by-hand gradients are the same function
    x, y = client_tensors(cfg, 0)
    x, y = x[:6], y[:6]
    clip = 0.05  # small enough that every example is clipped
    want = clipped_mean_by_hand(model, x, y, clip, expected=8.0)
    dp_step(model, x, y, DPSpec(0.0, clip, 0.5, 1, 8.0), torch.Generator().manual_seed(0), mean_loss)
    got = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and any(".lora_" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-7)
    assert float(torch.sqrt(sum(g.pow(2).sum() for g in got.values()))) <= 6 * clip / 8 + 1e-6
    # the noise: standard deviation σ C / expected batch, on an empty batch the gradient is noise alone
    dp_step(model, x[:0], y[:0], DPSpec(2.0, 0.5, 0.5, 1, 4.0), torch.Generator().manual_seed(1), mean_loss)
    noise = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 4.0, rel=0.02) and abs(float(noise.mean())) < 0.01


def test_sigma_for_a_target_epsilon_spends_it_over_the_run_and_more_noise_spends_less():
    cfg = resolve(compose(TINY_TEXT + ["method=fedit", "dp.epsilon=3", "num_rounds=5", "local.steps=10"]))
    spec = client_spec(cfg, 100)
    assert (spec.sample_rate, spec.steps, spec.expected_batch) == (0.16, 10, 16.0)
    spent = epsilon([[spec.noise_multiplier, spec.sample_rate, spec.steps]] * 5, 1e-5)
    assert 2.7 < spent <= 3.0
    assert epsilon([[2 * spec.noise_multiplier, spec.sample_rate, spec.steps]] * 5, 1e-5) < spent / 2
    assert client_spec(cfg, 400).noise_multiplier < spec.noise_multiplier  # a larger client samples less of itself
    ledger = PrivacyLedger(cfg, {})
    worst = [ledger.trained({0: 100, 1: 400} if r % 2 else {1: 400}) for r in range(5)]
    assert worst == sorted(worst) and 2.7 < ledger.record["epsilon"]["1"] <= 3.0  # client 1 trained every round
    assert 0 < ledger.record["epsilon"]["0"] < ledger.record["epsilon"]["1"]  # client 0 in 2 of the 5


@pytest.mark.parametrize("overrides, message", [
    (["dp.epsilon=3"], "the model has BatchNorm"),
    (["dp.epsilon=3", "dp.noise_multiplier=1"], "give one"),
    (["dp.epsilon=-1"], "dp.epsilon must be > 0"),
])
def test_dp_refuses_what_it_cannot_bound(overrides, message):
    from fedlora.preflight import preflight

    with pytest.raises(ConfigError, match=message):
        preflight(resolve(compose(overrides)))


def test_a_short_run_under_dp_counts_each_clients_epsilon_within_the_budget(preset_run, ray_address, tmp_path):
    from fedlora.simulation import run_simulation

    cfg = resolve(compose(PRESETS["fedit-lora"] + ["dp.epsilon=3", f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path)
    rows, plain = metrics_rows(tmp_path), metrics_rows(preset_run("fedit-lora")[1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in plain]  # DP changes values, not what travels
    assert all(r["num_clients"] == 2 and np.isfinite(r["train_loss"]) for r in rows)
    assert 0 < rows[0]["dp_epsilon"] <= rows[1]["dp_epsilon"] <= 3.0
    assert max(summary["dp"]["epsilon"].values()) == rows[1]["dp_epsilon"]
    assert rows[-1]["test_accuracy"] != plain[-1]["test_accuracy"]  # the noise did change the model


# --- central DP (dp.where=server): strategies/central_dp.py --------------------------------------------
def central_round(cfg, sigma, clip, perturbations, failed=()):
    """A FedAvg round through ServerSideFixedClipping: each reply is the round's start plus
    `perturbations[k]` times a fixed random direction; returns (start, replies' arrays, new global)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from strategies.central_dp import ServerSideFixedClipping
    from strategies.strategy import MethodStrategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    method, model = built(cfg)
    inner = MethodStrategy(method, model, {pid: 100 + pid for pid in range(cfg.num_clients)}, cfg.clients_per_round,
                           cfg.seed)
    strategy = ServerSideFixedClipping(inner, sigma, clip, cfg.seed)
    messages = list(strategy.configure_train(1, inner.global_arrays(), None, None))
    start = {k: t.numpy().copy() for k, t in inner.round_start().items()}
    gen = np.random.default_rng(0)
    sent = []
    for i, (msg, scale) in enumerate(zip(messages, perturbations)):
        if i in failed:  # the client's error, not a reply
            from flwr.app import Error

            strategy.accept(1, [Message(Error(code=0, reason="crashed"), reply_to=msg)])
            sent.append(None)
            continue
        direction = {k: gen.standard_normal(a.shape).astype(a.dtype) for k, a in start.items()}
        norm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in direction.values()))
        arrays = {k: (start[k] + d * (scale / norm)).astype(start[k].dtype) for k, d in direction.items()}
        sent.append(arrays)
        n = 10 * len(sent)  # unequal examples: central DP weighs the replies alike all the same
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5})})
        strategy.accept(1, [Message(content, reply_to=msg)])
    new, metrics = strategy.finish_train(1)
    return start, sent, {k: a.numpy() for k, a in new.items()}, metrics


def test_central_dp_without_noise_is_the_uniform_mean_of_the_updates_clipped_to_c():
    cfg = resolve(compose(["num_clients=6", "clients_per_round=3"]))
    start, sent, new, metrics = central_round(cfg, 0.0, 1.0, [0.5, 2.0, 4.0])
    for key in start:
        by_hand = start[key].astype(np.float64) + np.mean(
            [(s[key] - start[key]) * min(1.0, 1.0 / norm) for s, norm in zip(sent, [0.5, 2.0, 4.0])], axis=0)
        np.testing.assert_allclose(new[key], by_hand, atol=1e-6)
    assert metrics["num-clients"] == 3 and metrics["dp-released"] == 1
    assert metrics["dp-clipped"] == pytest.approx(2 / 3)  # two of the three updates were longer than C


def test_central_dp_divides_by_the_clients_sampled_and_keeps_a_zero_update():
    cfg = resolve(compose(["num_clients=6", "clients_per_round=3"]))
    start, sent, new, metrics = central_round(cfg, 0.0, 1.0, [0.0, 2.0, 0.5], failed=(2,))
    for key in start:  # (0 + the second update clipped to norm 1 + nothing) / 3
        np.testing.assert_allclose(new[key], start[key] + (sent[1][key] - start[key]) * 0.5 / 3, atol=1e-6)
    assert metrics["num-clients"] == 2 and metrics["dp-clipped"] == 0.5


def test_central_dp_noise_has_std_sigma_c_over_n_and_is_drawn_from_the_seed():
    cfg = resolve(compose(["num_clients=6", "clients_per_round=3"]))
    _, _, plain, _ = central_round(cfg, 0.0, 0.5, [0.1, 0.2, 0.3])
    _, _, noised, _ = central_round(cfg, 3.0, 0.5, [0.1, 0.2, 0.3])
    _, _, again, _ = central_round(cfg, 3.0, 0.5, [0.1, 0.2, 0.3])
    weights = [k for k in plain if not k.endswith("running_var")]  # variances are clamped at 0
    noise = np.concatenate([(noised[k].astype(np.float64) - plain[k]).ravel() for k in weights])
    assert noise.std() == pytest.approx(3.0 * 0.5 / 3, rel=0.02) and abs(noise.mean()) < 0.01
    assert all(np.array_equal(noised[k], again[k]) for k in noised)  # a resumed round draws the same noise
    assert all((noised[k] >= 0).all() for k in noised if k.endswith("running_var"))


def test_central_dp_counts_each_round_as_a_gaussian_release_and_finds_sigma_for_a_target():
    from fedlora.dp import CentralLedger, central_noise

    cfg = resolve(compose(["dp.where=server", "dp.epsilon=3", "num_rounds=10"]))
    sigma = central_noise(cfg)
    ledger = CentralLedger(cfg, {})
    spent = [ledger.released(1) for _ in range(10)]
    assert spent == sorted(spent) and 2.7 < spent[-1] <= 3.0
    assert ledger.released(0) == spent[-1]  # a round that aggregated nothing released nothing
    assert CentralLedger(cfg, {}).released(0) == 0.0
    assert central_noise(resolve(compose(["dp.where=server", "dp.epsilon=3", "num_rounds=40"]))) > sigma


@pytest.mark.parametrize("overrides, message", [
    (["dp.where=server", "dp.epsilon=3"] + TINY_TEXT + ["method=flora"], "method=flora combines the replies otherwise"),
    (["dp.where=server", "dp.epsilon=3"] + TINY_TEXT + ["method=fed_sb"], "use dp.where=client, or one of the methods"),
    (["dp.where=everywhere", "dp.epsilon=3"], "dp.where must be client"),
    (["dp.where=server", "dp.epsilon=3", "too_few=retry", "min_replies=2"], "use too_few=keep"),
])
def test_central_dp_refuses_methods_that_do_not_average(overrides, message):
    from fedlora.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(resolve(compose(overrides)))


def test_a_short_run_under_central_dp_takes_batchnorm_and_spends_the_target(preset_run, ray_address, tmp_path):
    from fedlora.simulation import run_simulation

    cfg = resolve(compose(PRESETS["fedavg"] + ["dp.where=server", "dp.epsilon=6", "dp.max_grad_norm=0.5",
                                               f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path)
    rows, plain = metrics_rows(tmp_path), metrics_rows(preset_run("fedavg")[1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["dp"]["releases"] == len(rows)
    assert [r["bytes_up"] for r in rows] == [r["bytes_up"] for r in plain]
    assert 0 < rows[0]["dp_epsilon"] < rows[-1]["dp_epsilon"] <= 6.0 and rows[-1]["dp_epsilon"] > 5.4
    assert all(0 <= r["dp_clipped"] <= 1 and np.isfinite(r["test_loss"]) for r in rows)
    assert rows[-1]["test_accuracy"] != plain[-1]["test_accuracy"]
