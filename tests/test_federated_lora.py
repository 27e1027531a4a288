"""Federated LoRA: the defining property of each method's aggregate, and a real short simulation of
each (2 rounds, a 2-layer MiniLM on a small AG News subset)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL, TINY_TEXT, built, metrics_rows
from fedlora.aggregate import Update, truncated_factors
from fedlora.config import compose, resolve
from fedlora.errors import ConfigError
from fedlora.ledger import serialized_bytes
from fedlora.methods.lora_fair import fair_refine
from fedlora.parametrizations.adapters import LoRA
from fedlora.parametrizations.base import delta_layers
from fedlora.simulation import run_simulation
from fedlora.state import state_tensors

WEIGHTS = [0.5, 0.3, 0.2]


def clients(frozen_a: bool):
    """Three clients' LoRA factors of the same layer, as after local training."""
    out = []
    for k in range(3):
        a = LoRA(48, 32, r=4)
        a.reset(7)  # the server's seed: identical A everywhere
        if frozen_a:
            a.lora_A.requires_grad_(False)
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))
            if not frozen_a:
                a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g))
        out.append(a)
    return out


def ideal(cs):
    return sum(w * c.matrix() for c, w in zip(cs, WEIGHTS))


def mean(cs, name):
    return sum(w * getattr(c, name) for c, w in zip(cs, WEIGHTS))


def test_ffa_lora_averages_the_products_exactly():
    cs = clients(frozen_a=True)
    assert torch.allclose(mean(cs, "lora_B") @ cs[0].lora_A, ideal(cs), atol=1e-5)


def test_ffa_lora_trains_and_sends_only_b_and_the_head():
    m, model = built(resolve(compose(TINY_TEXT + ["method=ffa_lora", "adapter=bora"])))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(m.up_keys(model, 1)) == set(m.global_keys(model))
    assert trained and all(n.endswith("lora_B") or "classifier" in n for n in trained)  # not A, not BoRA's σ


def test_fedit_does_not_and_lora_fair_comes_closer():
    cs = clients(frozen_a=False)
    target = ideal(cs)
    a_bar, b_bar = mean(cs, "lora_A").detach(), mean(cs, "lora_B").detach()
    fedit = b_bar @ a_bar
    assert (fedit - target).norm() > 0.1 * target.norm()
    server = LoRA(48, 32, r=4)
    with torch.no_grad():
        server.lora_A.copy_(a_bar)
        server.lora_B.copy_(b_bar)
    refined = fair_refine(server, target, lam=0.01, steps=100, lr=0.01)

    def cos(m):
        return F.cosine_similarity(m.flatten(), target.flatten(), dim=0).item()

    assert cos(refined @ a_bar) > cos(fedit) + 0.01


# --- FlexLoRA: the SVD of the mean of the clients' products -------------------------------------------


def products(k=3, m=20, n=12, r=3, seed=0):
    g = np.random.default_rng(seed)
    return [g.normal(size=(m, r)) @ g.normal(size=(r, n)) for _ in range(k)]


def test_truncated_factors_at_full_rank_are_the_mean_of_the_products():
    mean_product = sum(w * p for w, p in zip(WEIGHTS, products()))  # rank up to 9
    b, a = truncated_factors(mean_product, min(mean_product.shape))
    np.testing.assert_allclose(b @ a, mean_product, atol=1e-10)
    b, a = truncated_factors(mean_product, 9)  # its own rank: still exact
    np.testing.assert_allclose(b @ a, mean_product, atol=1e-10)


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (16, 16)])
def test_the_truncation_is_the_best_rank_r_approximation(shape):
    g = np.random.default_rng(1)
    matrix = g.normal(size=shape)
    s = np.linalg.svd(matrix, compute_uv=False)
    for r in (1, 3, 6):
        b, a = truncated_factors(matrix, r)
        assert b.shape == (shape[0], r) and a.shape == (r, shape[1])
        assert np.linalg.matrix_rank(b @ a) == r
        error = np.linalg.norm(matrix - b @ a)
        assert error == pytest.approx(np.sqrt((s[r:] ** 2).sum()), rel=1e-10)  # Eckart-Young
        for _ in range(20):  # no other rank-r matrix comes closer
            other = g.normal(size=(shape[0], r)) @ g.normal(size=(r, shape[1]))
            best_scale = (other * matrix).sum() / (other * other).sum()
            assert np.linalg.norm(matrix - best_scale * other) >= error


@pytest.mark.parametrize("shape", [(20, 12), (16, 16)])
def test_the_factors_rebuild_the_truncated_matrix_not_its_transpose(shape):
    """B A must be U_r Σ_r V_rᵀ itself: a rank-r matrix comes back exactly, a square one included,
    where a transposed V would still have the right shape."""
    g = np.random.default_rng(2)
    low_rank = g.normal(size=(shape[0], 3)) @ g.normal(size=(3, shape[1]))
    b, a = truncated_factors(low_rank, 3)
    np.testing.assert_allclose(b @ a, low_rank, atol=1e-10)
    assert not np.allclose(low_rank, low_rank.T) if shape[0] == shape[1] else True
    u, s, vh = np.linalg.svd(low_rank)
    np.testing.assert_allclose(b @ a, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-10)


def test_flexlora_sets_the_global_adapters_to_the_truncation_of_the_mean_update():
    cfg = resolve(compose(TINY_TEXT + ["method=flexlora", "adapter=lora", "adapter.r=2"]))
    m, model = built(cfg)
    keys = m.up_keys(model, 1)
    g = np.random.default_rng(3)
    updates = [Update({k: (g.normal(size=t.shape) * 0.1).astype(np.float32)
                       for k, t in state_tensors(model, keys).items()}, n) for n in (50, 30, 20)]
    layers = delta_layers(model)
    want = {}
    for name, layer in layers:
        full = sum(u.num_examples / 100 * layer.scaling * (u.arrays[f"{name}.delta.lora_B"].astype(np.float64)
                                                           @ u.arrays[f"{name}.delta.lora_A"]) for u in updates)
        u_, s, vh = np.linalg.svd(full)
        want[name] = (u_[:, :2] * s[:2]) @ vh[:2]
    m.aggregate(model, updates)
    for name, layer in layers:
        np.testing.assert_allclose(layer.scaled_delta().detach().numpy(), want[name], rtol=1e-4, atol=1e-6)
    head = next(k for k in keys if k.endswith("classifier.weight"))
    np.testing.assert_allclose(state_tensors(model, [head])[head].numpy(),
                               sum(u.num_examples / 100 * u.arrays[head] for u in updates), rtol=1e-5, atol=1e-7)


def test_flexlora_refuses_an_adapter_that_is_not_a_product():
    with pytest.raises(ConfigError, match="adapter=bora is not one of them: use adapter=lora or lora_nonzero"):
        resolve(compose(TINY_TEXT + ["method=flexlora", "adapter=bora"]))


# --- short real runs -------------------------------------------------------------------------------


def sent_per_client(cfg):
    m, model = built(cfg)
    return sum(serialized_bytes(t) for t in state_tensors(model, m.global_keys(model)).values()), m, model


@pytest.mark.parametrize("preset", ["fedit-lora", "ffa_lora-lora_nonzero", "lora_fair-bora"])
def test_a_short_run_sends_the_adapters_and_the_head_only(preset, preset_run):
    cfg, run_dir = preset_run(preset)
    rows = metrics_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2]
    sent, m, model = sent_per_client(cfg)  # the adapters and the head, nothing else
    assert all(r["num_clients"] == 2 and r["bytes_up"] == r["bytes_down"] == 2 * sent for r in rows)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(m.global_keys(model)) == trained and any("classifier" in n for n in trained)
    assert any("lora_A" in n for n in trained) != preset.startswith("ffa_lora")
    assert 0 <= rows[-1]["test_accuracy"] <= 1 and rows[-1]["train_loss"] > 0
    export = run_dir / "adapter"
    if cfg.adapter.name == "lora":  # a PEFT checkpoint
        assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    else:  # BoRA, and LoRA that changed the frozen weights: merged, a plain Hugging Face checkpoint
        from transformers import AutoModelForSequenceClassification

        assert (export / "config.json").is_file()
        AutoModelForSequenceClassification.from_pretrained(str(export))


def test_a_short_run_of_flexlora(preset_run):
    cfg, run_dir = preset_run("flexlora-lora")
    rows = metrics_rows(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    sent, _, _ = sent_per_client(cfg)  # FedIT's bytes both ways: the SVD's factors go down
    assert all(r["num_clients"] == 2 and r["rejected"] == 0 and r["bytes_up"] == r["bytes_down"] == 2 * sent
               for r in rows)
    assert rows[-1]["train_loss"] > 0


def test_a_short_run_fine_tunes_a_hugging_face_image_classifier(tiny_vit, ray_address, tmp_path):
    """model.hf=PATH on an image data set: a ViT (here a tiny one) with LoRA on its attention, a new
    10-class head, Fashion-MNIST resized and given three channels; the global adapter exported for PEFT."""
    from peft import PeftModel

    from fedlora.hf import ImageClassifier, load_classifier

    cfg = resolve(compose([*SMALL, f"model.hf={tiny_vit}", "method=fedit", "adapter=lora", "adapter.r=4",
                           f"simulation.ray_address={ray_address}"]))
    assert cfg.model.name == "hf"
    run_simulation(cfg, tmp_path)
    rows = metrics_rows(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed" and len(rows) == 2
    sent, m, model = sent_per_client(cfg)
    assert isinstance(model, ImageClassifier)
    assert {n.rsplit(".", 3)[-3] for n in m.global_keys(model) if "lora_" in n} == {"q_proj", "v_proj"}
    assert all(r["num_clients"] == 2 and r["bytes_up"] == 2 * sent for r in rows)
    loaded = PeftModel.from_pretrained(load_classifier(tiny_vit, 10, seed=7, image=True), str(tmp_path / "adapter"))
    assert loaded(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 10)
