"""The defining properties of each factorization: exact aggregation where FedMUD claims it, Kronecker
blocks, rank, fold-and-reset, seeded frozen factors, and the compression ratio of the paper's models."""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from conftest import built
from fedlora.config import compose, resolve
from fedlora.ledger import serialized_bytes
from fedlora.models import build_model
from fedlora.parametrizations.base import DeltaLayer, adaptable_layers, delta_layers, reset_deltas
from fedlora.parametrizations.factorizations import (KINDS, AggregationAwareKronecker, AggregationAwareLowRank,
                                                     HadamardLowRank, Kronecker, LowRank, LowRankWeight, factorize)
from fedlora.parametrizations.sizing import kron_shapes, plan_sizes
from fedlora.state import state_tensors

M, N = 48, 36
SHAPE = next(s for s in kron_shapes(M, N) if s.blocks == 4 and s.h1 > 1 and s.w1 > 1)


def make(kind, seed=0):
    build = {"lowrank": lambda: LowRank(M, N, 3, 5.0), "aad_lowrank": lambda: AggregationAwareLowRank(M, N, 3, 5.0),
             "kronecker": lambda: Kronecker(M, N, SHAPE, 5.0),
             "aad_kronecker": lambda: AggregationAwareKronecker(M, N, SHAPE, 5.0),
             "lowrank_weight": lambda: LowRankWeight(M, N, 3, 0.01), "hadamard": lambda: HadamardLowRank(M, N, 3, 0.01)}
    f = build[kind]()
    f.reset(seed)
    return f


def trained_clients(kind, k=4):
    """k clients that drew the same frozen factors from the round seed and trained differently."""
    clients = []
    for i in range(k):
        f = make(kind)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in f.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        clients.append(f)
    return clients


def averaged(clients, weights):
    avg = make(kind_of(clients[0]))
    with torch.no_grad():
        for name, p in avg.named_parameters():
            p.copy_(sum(w * dict(c.named_parameters())[name] for c, w in zip(clients, weights)))
    return avg


def kind_of(f):
    return {LowRank: "lowrank", AggregationAwareLowRank: "aad_lowrank", Kronecker: "kronecker",
            AggregationAwareKronecker: "aad_kronecker", LowRankWeight: "lowrank_weight",
            HadamardLowRank: "hadamard"}[type(f)]


WEIGHTS = [0.1, 0.2, 0.3, 0.4]  # examples-weighted, as the server averages


@pytest.mark.parametrize("kind", ["aad_lowrank", "aad_kronecker"])
def test_aad_averaging_the_factors_averages_the_updates_exactly(kind):
    clients = trained_clients(kind)
    ideal = sum(w * c.matrix() for c, w in zip(clients, WEIGHTS))
    got = averaged(clients, WEIGHTS).matrix()
    assert torch.allclose(got, ideal, rtol=1e-5, atol=1e-5 * ideal.abs().max().item())


@pytest.mark.parametrize("kind", ["lowrank", "kronecker", "lowrank_weight", "hadamard"])
def test_averaging_both_trained_factors_is_not_the_average_update(kind):
    clients = trained_clients(kind)
    ideal = sum(w * c.matrix() for c, w in zip(clients, WEIGHTS))
    got = averaged(clients, WEIGHTS).matrix()
    assert (got - ideal).norm() > 0.1 * ideal.norm()


def test_a_kronecker_block_is_the_kron_of_its_factors():
    f = trained_clients("kronecker", 1)[0]
    h, w = SHAPE.h1 * SHAPE.h2, SHAPE.w1 * SHAPE.w2
    W = f.matrix()
    assert W.shape == (M, N)
    for o in range(SHAPE.blocks):
        r, c = divmod(o, SHAPE.cols)
        assert torch.allclose(W[r * h:(r + 1) * h, c * w:(c + 1) * w], torch.kron(f.A[o], f.B[o]))


@pytest.mark.parametrize("kind", ["lowrank", "aad_lowrank"])
def test_a_low_rank_delta_applies_its_update_without_forming_it_and_gets_the_formed_output_and_gradients(kind):
    from fedlora.parametrizations.base import Delta

    f = trained_clients(kind, 1)[0]
    for b in f.buffers():  # the frozen factors too: every factor non-zero
        b.add_(0.1 * torch.randn_like(b))
    x = torch.randn(4, 16, N, requires_grad=True)
    outputs, grads = [], []
    for forward in (type(f).forward, Delta.forward):  # the class's own, and x (s ΔW)ᵀ with ΔW formed
        f.zero_grad()
        x.grad = None
        y = forward(f, x, 0.5)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outputs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in f.parameters()])
    assert outputs[0].shape == (4, 16, M) and torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_kronecker_tilings_are_exact_and_reach_a_higher_rank_than_low_rank_at_equal_parameters():
    for m, n in ((192, 96), (384, 192), (768, 384), (100, 30), (97, 64)):
        for s in kron_shapes(m, n):
            assert s.rows * s.h1 * s.h2 == m and s.cols * s.w1 * s.w2 == n  # no dead blocks, no waste
            assert s.count < m * n
    torch.manual_seed(0)
    for m, n in ((192, 96), (384, 192), (768, 384)):
        for s in kron_shapes(m, n)[:10]:
            rank = s.count // (m + n)  # the largest low-rank L R with no more parameters
            f = Kronecker(m, n, s, 1.0)
            with torch.no_grad():
                f.A.normal_()
                f.B.normal_()
            assert torch.linalg.matrix_rank(f.matrix()) > max(rank, 1)
            assert f.trainable_count == s.count


def test_aad_has_the_budget_of_low_rank_and_twice_its_rank():
    torch.manual_seed(0)
    lr, aad = LowRank(M, N, 3, 5.0), AggregationAwareLowRank(M, N, 3, 5.0)
    aad.reset(1)
    with torch.no_grad():
        aad.R1.normal_()
        aad.L2.normal_()
    assert lr.trainable_count == aad.trainable_count == 3 * (M + N)
    assert torch.linalg.matrix_rank(aad.matrix()) == 6


def test_fedpara_reaches_rank_r_squared_with_2r_of_parameters():
    f = make("hadamard")
    assert torch.linalg.matrix_rank(f.matrix()) == 9 and f.trainable_count == 2 * 3 * (M + N)


@pytest.mark.parametrize("kind", ["lowrank", "aad_lowrank", "kronecker", "aad_kronecker"])
def test_fold_and_reset_zero_the_update_and_keep_the_output(kind):
    model = build_model("fmnist_cnn", 10, 0)
    factorize(model, kind, plan_sizes(model, kind, 1 / 16).sizes, 5.0)
    reset_deltas(model, 1)
    assert all(layer.delta.matrix().abs().max() == 0 for _, layer in delta_layers(model))  # ΔW = 0 at start
    with torch.no_grad():
        for _, layer in delta_layers(model):
            for p in layer.delta.parameters():
                p.normal_(0, 0.05)
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    before = model(x)
    for _, layer in delta_layers(model):
        layer.fold()
    reset_deltas(model, 2)
    assert all(layer.delta.matrix().abs().max() == 0 for _, layer in delta_layers(model))
    assert torch.allclose(model(x), before, atol=1e-4)


def test_an_evaluation_forms_each_weight_once_and_training_at_every_call(monkeypatch):
    """`evaluate` forms each layer's W + s ΔW once for all its batches (benchmarks/README.md, fix 12),
    with the outputs of the weight formed at every batch; outside an evaluation, and with gradients,
    it is formed at every call, so that an evaluation after a change of the factors sees the change."""
    from fedlora.training import evaluate

    model = build_model("fmnist_cnn", 10, 0)
    factorize(model, "aad_kronecker", plan_sizes(model, "aad_kronecker", 1 / 16).sizes, 5.0)
    reset_deltas(model, 1)
    layers = [layer for _, layer in delta_layers(model)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.delta.parameters():
                p.normal_(0, 0.05)
    formed = []
    full_weight = DeltaLayer.full_weight
    monkeypatch.setattr(DeltaLayer, "full_weight", lambda self: formed.append(self) or full_weight(self))
    g = torch.Generator().manual_seed(0)
    x, y, cpu = torch.randn(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g), torch.device("cpu")
    once = evaluate(model, x, y, 8, cpu)  # five batches
    assert formed == layers and all(layer._formed is None for layer in layers)  # nothing kept after
    with torch.no_grad():  # outside an evaluation: at every call
        model(x[:8]), model(x[:8])
    assert len(formed) == 3 * len(layers)
    monkeypatch.setattr(DeltaLayer, "_formed_weight", lambda self: self.full_weight())  # as before fix 12
    assert evaluate(model, x, y, 8, cpu) == once
    monkeypatch.undo()
    with torch.no_grad():
        next(layers[0].delta.parameters()).add_(0.1)  # the factors change between evaluations
    changed = evaluate(model, x, y, 8, cpu)
    monkeypatch.setattr(DeltaLayer, "_formed_weight", lambda self: self.full_weight())
    assert changed != once and evaluate(model, x, y, 8, cpu) == changed
    monkeypatch.undo()
    model.train()
    from fedlora.parametrizations.base import weights_formed_once

    with weights_formed_once(model):  # with gradients (training) always formed anew
        assert model(x[:8]).requires_grad and all(layer._formed is None for layer in layers)


FROZEN = """
import hashlib, torch
from fedlora.parametrizations.factorizations import AggregationAwareKronecker, AggregationAwareLowRank
from fedlora.parametrizations.sizing import kron_shapes
s = kron_shapes(48, 36)[5]
for f in (AggregationAwareLowRank(48, 36, 3, 5.0), AggregationAwareKronecker(48, 36, s, 5.0)):
    f.reset(1234)
    print(hashlib.sha256(b"".join(b.numpy().tobytes() for b in f.buffers())).hexdigest())
"""


def test_frozen_factors_are_identical_in_two_processes():
    runs = [subprocess.run([sys.executable, "-c", FROZEN], capture_output=True, text=True, cwd=ROOT, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0].split()) == 2
    f = AggregationAwareLowRank(48, 36, 3, 5.0)
    f.reset(1234)
    g = AggregationAwareLowRank(48, 36, 3, 5.0)
    g.reset(1235)
    assert not torch.equal(f.L1, g.L1)  # a different seed draws different factors
    assert f.L1.abs().max() <= 5.0 and f.L1.abs().max() > 4.0  # U(-5, 5)


@pytest.mark.parametrize("model_name", ["fmnist_cnn", "vgg_cifar", "resnet18"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_paper_models_meet_one_thirty_second(model_name, kind):
    model = build_model(model_name, 10, 0)
    plan = plan_sizes(model, kind, 1 / 32)
    assert plan.reachable and abs(plan.estimate - 1 / 32) <= 0.05 / 32


def test_adapting_the_first_and_last_layers_reaches_one_sixty_fourth():
    for kind in ("lowrank", "aad_kronecker"):
        model = build_model("fmnist_cnn", 10, 0)
        assert not plan_sizes(model, kind, 1 / 64).reachable  # the dense first and last layers are too large
        plan = plan_sizes(model, kind, 1 / 64, dense_first_last=False)
        assert plan.reachable and "features.0" in plan.sizes and "classifier" in plan.sizes


def test_layers_that_cannot_be_factorized_are_config_errors():
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="no Conv2d or Linear layer to factorize"):
        plan_sizes(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), "lowrank", 0.5)
    attention = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.MultiheadAttention(8, 2), torch.nn.Linear(8, 8))
    assert [n for n, _ in adaptable_layers(attention)] == ["0", "2"]  # not the projection attention reads directly


def test_svhn_at_one_thirty_second_says_why_it_is_out_of_reach():
    plan = plan_sizes(build_model("svhn_cnn", 10, 0), "aad_kronecker", 1 / 32)
    assert not plan.reachable and "out of reach" in plan.note and plan.estimate > 1 / 32


@pytest.mark.parametrize("method", ["fedmud", "fedmud_bkd", "fedmud_aad", "fedmud_bkd_aad", "fedlmt", "fedpara"])
def test_measured_uplink_is_the_trainable_tensors_and_meets_the_ratio(method):
    cfg = resolve(compose([f"method={method}"]))
    m, model = built(cfg)
    c = m.describe(model)
    up = state_tensors(model, m.up_keys(model, 1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    assert set(up) <= trainable | buffers and trainable <= set(up)
    assert not any(k.endswith(".weight") and isinstance(model.get_submodule(k.rsplit(".", 1)[0]), DeltaLayer)
                   for k in up)  # the frozen base weights stay home
    assert c["uplink_bytes_per_client"] == sum(serialized_bytes(t) for t in up.values())
    assert c["within_5_percent"] and abs(c["achieved"] - 1 / 32) <= 0.05 / 32


def test_fedlmt_and_fedpara_start_at_the_dense_layers_scale():
    for kind in ("lowrank_weight", "hadamard"):
        model = build_model("vgg_cifar", 10, 0)
        dense = dict(model.named_modules())["features.14"].weight.var().item()
        factorize(model, kind, plan_sizes(model, kind, 1 / 8).sizes, 0.0)
        reset_deltas(model, 3)
        w = dict(model.named_modules())["features.14"].full_weight()
        assert 0.5 < w.var().item() / dense < 2.0
