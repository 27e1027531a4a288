"""The defining properties of the adapters: LoRA's zero and non-zero initialisation, BoRA's blocks,
parameter count and rank, folding, and injection by target names; and that the one base layer carries
FedMUD's factorizations onto a pretrained model's layers and the adapters onto a CNN's."""

import pytest
import torch
from torch import nn

from fedlora.errors import ConfigError
from fedlora.parametrizations.adapters import BoRA, BoRAConfig, LoRA, LoRAConfig, inject_adapters
from fedlora.parametrizations.base import DeltaLayer, delta_layers, reset_deltas
from fedlora.parametrizations.factorizations import AggregationAwareKronecker, factorize
from fedlora.parametrizations.sizing import kron_shapes


def linear(m=96, n=64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n, m)


def adapted(base, delta, alpha, subtract_initial=False):
    return DeltaLayer(base, delta, scaling=alpha / delta.r, additive=True, subtract_initial=subtract_initial)


def lora_config(**kw):
    return LoRAConfig(name="lora", r=kw.pop("r", 2), alpha=kw.pop("alpha", 4.0), dropout=0.0,
                      targets=kw.pop("targets", ["query", "value"]), train=kw.pop("train", []), init="zero", **kw)


def test_zero_init_lora_starts_at_the_pretrained_model():
    base = linear()
    x = torch.randn(5, 64)
    expected = base(x)
    a = adapted(base, LoRA(96, 64, r=8), alpha=16)
    a.reset(1)
    assert torch.equal(a.delta.lora_B, torch.zeros(96, 8)) and a.delta.lora_A.abs().max() <= 1 / 64 ** 0.5
    assert torch.allclose(a(x), expected) and a.scaling == 2.0


def test_nonzero_init_has_the_stated_variance_per_factor():
    a = LoRA(512, 512, r=128, init="nonzero", beta_a=2.0, beta_b=0.5)
    a.reset(3)
    for p, beta in ((a.lora_A, 2.0), (a.lora_B, 0.5)):
        # U(-c, c) with c = sqrt(beta / n) has variance c^2 / 3
        assert p.var().item() == pytest.approx(beta / (3 * 512), rel=0.05)
        assert p.abs().max().item() <= (beta / 512) ** 0.5
    assert a.matrix().abs().max() > 0  # the initial update is not zero


def test_nonzero_init_with_subtraction_leaves_the_output_unchanged():
    base = linear()
    x = torch.randn(5, 64)
    expected = base(x)
    a = adapted(base, LoRA(96, 64, r=8, init="nonzero"), alpha=16, subtract_initial=True)
    a.reset(1)
    a.reset(2)  # a second draw subtracts relative to the pretrained weight, not twice
    assert a.delta.matrix().abs().max() > 0
    assert torch.allclose(a(x), expected, atol=1e-5)


def test_bora_counts_its_parameters_and_reaches_rank_b_r():
    m, n, r, b = 96, 64, 2, 4
    a = BoRA(m, n, r=r, blocks=b)
    a.reset(0)
    assert a.trainable_count == (m + n) * r + b * b * r
    assert a.matrix().abs().max() == 0  # B = 0
    with torch.no_grad():
        a.lora_B.normal_()
    assert torch.linalg.matrix_rank(a.matrix()) == b * r
    lora = LoRA(m, n, r=r)
    with torch.no_grad():
        lora.lora_A.copy_(a.lora_A)
        lora.lora_B.copy_(a.lora_B)
    assert torch.linalg.matrix_rank(lora.matrix()) == r


def test_bora_blocks_are_uneven_when_needed_and_with_one_block_and_identity_it_is_lora():
    a = BoRA(10, 7, r=2, blocks=3)
    a.reset(0)
    with torch.no_grad():
        a.lora_B.normal_()
    assert (a.row_sizes, a.col_sizes) == ([4, 3, 3], [3, 2, 2])
    d, u = a.diagonals(), a.matrix()
    # block (1, 2): rows 4..6, columns 5..6
    assert torch.allclose(u[4:7, 5:7], a.lora_B[4:7] @ torch.diag(d[1, 2]) @ a.lora_A[:, 5:7])
    one = BoRA(10, 7, r=2, blocks=1)
    one.reset(0)
    with torch.no_grad():
        one.lora_B.normal_()
    one.diagonals = lambda: torch.ones(1, 1, 2)  # Σ = I
    assert torch.allclose(one.matrix(), one.lora_B @ one.lora_A)


def test_bora_applies_its_blocks_without_forming_the_update_with_the_same_output_and_gradients():
    from fedlora.parametrizations.base import Delta

    a = BoRA(10, 7, r=2, blocks=3)  # uneven blocks
    a.reset(0)
    with torch.no_grad():
        a.lora_B.normal_()
    x = torch.randn(5, 3, 7, requires_grad=True)
    outputs, grads = [], []
    for forward in (BoRA.forward, Delta.forward):  # its own, and x (s ΔW)ᵀ with ΔW formed
        a.zero_grad()
        x.grad = None
        y = forward(a, x, 2.0)
        (y * torch.arange(10.0)).sum().backward()
        outputs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in a.parameters()])
    assert outputs[0].shape == (5, 3, 10) and torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for got, want in zip(*grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("delta", [lambda: LoRA(96, 64, 4, init="nonzero"), lambda: BoRA(96, 64, 4, blocks=2)])
def test_folding_an_adapter_keeps_the_output(delta):
    base = linear()
    a = adapted(base, delta(), alpha=8)
    a.reset(5)
    with torch.no_grad():
        a.delta.lora_B.normal_()
    x = torch.randn(3, 64)
    before, weight = a(x), a.weight.clone()
    merged = a.as_base()  # a plain Linear with W + s ΔW
    assert type(merged) is nn.Linear and torch.allclose(merged(x), before, atol=1e-5)
    a.fold()
    assert not torch.allclose(a.weight, weight)
    assert torch.allclose(a.weight, merged.weight)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value, self.dense = (nn.Linear(16, 16) for _ in range(4))


def test_injection_by_target_names_freezes_the_rest():
    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    model.classifier = nn.Linear(16, 4)
    names = inject_adapters(model, lora_config(train=["classifier"]))
    assert names == ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.delta.{f}" for n in names for f in ("lora_A", "lora_B")} | {"classifier.weight",
                                                                                          "classifier.bias"}
    reset_deltas(model, 7)
    first = [layer.delta.lora_A.clone() for _, layer in delta_layers(model)]
    reset_deltas(model, 7)
    assert all(torch.equal(x, layer.delta.lora_A) for x, (_, layer) in zip(first, delta_layers(model)))  # same seed
    assert not torch.equal(first[0], first[1])  # each layer its own draw
    with pytest.raises(ConfigError, match="no Linear or Conv2d layer matches adapter.targets"):
        inject_adapters(nn.Sequential(nn.Linear(2, 2)), lora_config(r=1))
    assert inject_adapters(Block(), lora_config(r=1, targets=["re:(query|key)"])) == ["query", "key"]
    with pytest.raises(ConfigError, match="adapter.train.*names no module"):
        inject_adapters(Block(), lora_config(r=1, train=["head"]))
    with pytest.raises(ConfigError, match="adapter.r=32 must be between 1 and"):
        inject_adapters(Block(), lora_config(r=32))


def test_adapters_go_on_a_cnns_layers_and_factorizations_on_a_pretrained_models():
    """The one base layer needs no plumbing of its own: LoRA on a CNN's convolutions (as the matrix
    that reshapes to the kernel), FedMUD's full factorization on a BERT-style block's Linear layers."""
    from fedlora.models import build_model

    cnn = build_model("fmnist_cnn", 10, 0)
    x = torch.randn(2, 1, 28, 28)
    cnn.eval()
    before = cnn(x)
    names = inject_adapters(cnn, lora_config(r=2, targets=["features.4", "features.8"], train=["classifier"]))
    reset_deltas(cnn, 1)
    assert names == ["features.4", "features.8"] and torch.allclose(cnn(x), before, atol=1e-6)  # B = 0
    conv = dict(delta_layers(cnn))["features.4"]
    assert conv.delta.lora_A.shape == (2, 32 * 3) and conv.delta.lora_B.shape == (64 * 3, 2)
    with torch.no_grad():
        conv.delta.lora_B.normal_()
    assert not torch.allclose(cnn(x), before)

    block = nn.Sequential(Block(), nn.Linear(16, 4))
    shape = kron_shapes(16, 16)[0]
    factorize(block, "aad_kronecker", {"0.query": shape, "0.value": shape}, 5.0)
    reset_deltas(block, 2)
    layers = dict(delta_layers(block))
    assert set(layers) == {"0.query", "0.value"} and isinstance(layers["0.query"].delta, AggregationAwareKronecker)
    assert all(layer.delta.matrix().abs().max() == 0 for layer in layers.values())  # ΔW = 0 at the start


def test_adapter_configs_check_their_values():
    with pytest.raises(ConfigError, match="adapter.init must be zero or nonzero"):
        LoRAConfig(name="lora", r=2, alpha=4, dropout=0.0, targets=["q"], train=[], init="random").validate()
    with pytest.raises(ConfigError, match="adapter.blocks must be >= 1"):
        BoRAConfig(name="bora", r=2, alpha=4, dropout=0.0, targets=["q"], train=[], blocks=0).validate()
    with pytest.raises(ConfigError, match=r"adapter.dropout must be in \[0, 1\)"):
        LoRAConfig(name="lora", r=2, alpha=4, dropout=1.0, targets=["q"], train=[], init="zero").validate()
