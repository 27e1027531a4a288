"""Federated LoRA: the defining property of each strategy's aggregate, and a real short simulation of
each (2 rounds, a 2-layer MiniLM on a small AG News subset)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SMALL
from fedlora.adapters import LoRA, fair_refine, freeze_a
from fedlora.config import compose, resolve
from fedlora.simulation import run_simulation
from fedlora.task import initial_model, model_to_arrays

WEIGHTS = [0.5, 0.3, 0.2]


def clients(frozen_a: bool):
    """Three clients' LoRA adapters on the same layer, as after local training."""
    out = []
    for k in range(3):
        torch.manual_seed(0)
        a = LoRA(nn.Linear(32, 48), r=4, alpha=8)
        a.reset(7)  # the server's seed: identical A everywhere
        if frozen_a:
            freeze_a(a)
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))
            if not frozen_a:
                a.lora_A.copy_(torch.randn(a.lora_A.shape, generator=g))
        out.append(a)
    return out


def ideal(cs):
    return sum(w * c.update() for c, w in zip(cs, WEIGHTS))


def mean(cs, name):
    return sum(w * getattr(c, name) for c, w in zip(cs, WEIGHTS))


def test_ffa_lora_averages_the_products_exactly():
    cs = clients(frozen_a=True)
    assert not cs[0].lora_A.requires_grad and cs[0].lora_B.requires_grad
    assert torch.allclose(mean(cs, "lora_B") @ cs[0].lora_A, ideal(cs), atol=1e-5)


def test_fedit_does_not_and_lora_fair_comes_closer():
    cs = clients(frozen_a=False)
    target = ideal(cs)
    a_bar, b_bar = mean(cs, "lora_A").detach(), mean(cs, "lora_B").detach()
    fedit = b_bar @ a_bar
    assert (fedit - target).norm() > 0.1 * target.norm()
    server = LoRA(nn.Linear(32, 48), r=4, alpha=8)
    with torch.no_grad():
        server.lora_A.copy_(a_bar)
        server.lora_B.copy_(b_bar)
    refined = fair_refine(server, target, lam=0.01, steps=100, lr=0.01)

    def cos(m):
        return F.cosine_similarity(m.flatten(), target.flatten(), dim=0).item()

    assert cos(refined @ a_bar) > cos(fedit) + 0.01


TINY = ["dataset=agnews", "model.num_layers=2", "model.max_length=32", "data.train_samples=400",
        "data.test_samples=200", "local.batch_size=16", *[s for s in SMALL if s.startswith(("num_", "clients_"))]]


@pytest.mark.parametrize("method, adapter", [("fedit", "lora"), ("ffa_lora", "lora_nonzero"), ("lora_fair", "bora")])
def test_a_short_run_of_each_strategy(method, adapter, ray_address, tmp_path):
    cfg = resolve(compose(TINY + [f"method={method}", f"adapter={adapter}", f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in rows] == [1, 2]
    model = initial_model(cfg)
    sent = sum(len(a.data) for a in model_to_arrays(model).values())  # the adapters and the head, nothing else
    assert all(r["num_clients"] == 2 and r["bytes_up"] == r["bytes_down"] == 2 * sent for r in rows)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(model_to_arrays(model)) == trained and any("classifier" in n for n in trained)
    assert not any("lora_A" in n for n in trained) if method == "ffa_lora" else any("lora_A" in n for n in trained)
    assert 0 <= rows[-1]["test_accuracy"] <= 1 and rows[-1]["train_loss"] > 0
    export = tmp_path / "adapter"
    if adapter == "lora":  # a PEFT checkpoint
        assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    else:  # BoRA, and LoRA that changed the frozen weights: merged, a plain Hugging Face checkpoint
        from transformers import AutoModelForSequenceClassification

        assert (export / "config.json").is_file()
        AutoModelForSequenceClassification.from_pretrained(str(export))


def test_a_short_run_fine_tunes_a_hugging_face_image_classifier(tiny_vit, ray_address, tmp_path):
    """model.hf=PATH on an image data set: a ViT (here a tiny one) with LoRA on its attention, a new
    10-class head, Fashion-MNIST resized and given three channels; the global adapter exported for PEFT."""
    from peft import PeftModel

    from fedlora.hf import ImageClassifier, load_classifier

    cfg = resolve(compose([*SMALL, f"model.hf={tiny_vit}", "method=fedit", "adapter=lora", "adapter.r=4",
                           f"simulation.ray_address={ray_address}"]))
    assert cfg.model.name == "hf"
    run_simulation(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed" and len(rows) == 2
    model = initial_model(cfg)
    assert isinstance(model, ImageClassifier)
    sent = sum(len(a.data) for a in model_to_arrays(model).values())
    assert {n.rsplit(".", 2)[-2] for n in model_to_arrays(model) if "lora_" in n} == {"q_proj", "v_proj"}
    assert all(r["num_clients"] == 2 and r["bytes_up"] == 2 * sent for r in rows)
    loaded = PeftModel.from_pretrained(load_classifier(tiny_vit, 10, seed=7, image=True), str(tmp_path / "adapter"))
    assert loaded(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 10)
