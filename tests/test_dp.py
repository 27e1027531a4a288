"""Client-side DP-SGD: each example's gradient clipped to C, Gaussian noise of σ C on the sum, the
expected batch size as divisor; σ found for a target ε; privacy counted per client by the RDP
accountant; and a short real run under a budget."""

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
    dp_step(model, x, y, DPSpec(0.0, clip, 0.5, 1, 8.0), torch.Generator().manual_seed(0))
    got = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and any(".lora_" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-7)
    assert float(torch.sqrt(sum(g.pow(2).sum() for g in got.values()))) <= 6 * clip / 8 + 1e-6
    # the noise: standard deviation σ C / expected batch, on an empty batch the gradient is noise alone
    dp_step(model, x[:0], y[:0], DPSpec(2.0, 0.5, 0.5, 1, 4.0), torch.Generator().manual_seed(1))
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
