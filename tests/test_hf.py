"""Pretrained models with adapters (text and image): the PEFT export of a trained LoRA loads to the same logits."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedlora.errors import ConfigError, DataError
from fedlora.parametrizations.adapters import LoRAConfig, inject_adapters
from fedlora.parametrizations.base import delta_layers, reset_deltas
from fedlora.hf import MINILM, export_peft_lora, image_classifier, load_classifier


def lora(r, alpha, targets):
    return LoRAConfig(name="lora", r=r, alpha=alpha, dropout=0.0, targets=targets, train=["classifier"], init="zero")


def minilm(seed=3):
    return load_classifier(MINILM, 4, seed=seed, num_layers=2)


def test_the_same_seed_draws_the_same_head():
    a, b, c = minilm(1), minilm(1), minilm(2)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert len(a.bert.encoder.layer) == 2


def test_peft_export_round_trip_gives_the_same_logits(tmp_path):
    from peft import PeftModel

    model = minilm()
    names = inject_adapters(model, lora(8, 16.0, ["query", "value"]))
    assert len(names) == 4
    reset_deltas(model, 1)
    with torch.no_grad():  # as if trained
        for _, layer in delta_layers(model):
            layer.delta.lora_B.normal_(0, 0.1)
        model.classifier.weight.normal_()
    ids = torch.randint(1000, 5000, (3, 12))
    mask = torch.ones_like(ids)
    ours = model.eval()(input_ids=ids, attention_mask=mask).logits
    export_peft_lora(model, tmp_path, minilm(), MINILM, ["query", "value"], ["classifier"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = PeftModel.from_pretrained(minilm(seed=99), str(tmp_path)).eval()  # its own head is replaced
    theirs = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and ours.abs().max() > 0.1


def test_a_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load model"):
        load_classifier(str(tmp_path / "nowhere"), 4, seed=0)


def test_agnews_is_read_tokenized_once_and_classified(tmp_path):
    import numpy as np

    from fedlora.hf import model_path
    from fedlora.text import AGNEWS_LABELS, TextClassifier, read_agnews, tokenize

    root = os.environ["FEDLORA_DATA"]
    texts, labels = read_agnews(root, "test")
    assert len(texts) == 7600 and np.bincount(labels).tolist() == [1900] * 4 and len(AGNEWS_LABELS) == 4
    source = Path(root) / "agnews" / "test.tsv"
    tokens = tokenize(texts[:64], model_path(MINILM), 32, tmp_path, source)
    assert tokens.shape == (64, 2, 32) and tokens.dtype == np.int64
    assert set(np.unique(tokens[:, 1])) <= {0, 1} and (tokens[:, 1, 0] == 1).all()
    (entry,) = tmp_path.iterdir()  # the entry alone: nothing written aside is left
    assert entry.name.startswith("tokens-") and entry.suffix == ".npy"
    cached = tokenize(texts[:64], model_path(MINILM), 32, tmp_path, source)
    assert np.array_equal(cached, tokens) and isinstance(cached, np.memmap)  # from the cache, mapped (shared)
    hf = minilm()
    x = torch.from_numpy(tokens[:4])
    logits = TextClassifier(hf).eval()(x)
    assert torch.allclose(logits, hf(input_ids=x[:, 0], attention_mask=x[:, 1]).logits) and logits.shape == (4, 4)
    # padded far past the longest text: the padding columns are dropped, the logits stay
    long = torch.from_numpy(tokenize(texts[:4], model_path(MINILM), 256))
    assert long[:, 1].sum(dim=1).max() < 128
    assert torch.allclose(TextClassifier(hf).eval()(long), hf(input_ids=long[:, 0], attention_mask=long[:, 1]).logits,
                          atol=1e-5)
    with pytest.raises(DataError, match="agnews/dev.tsv"):
        read_agnews(tmp_path, "train")


def test_an_image_classifier_sees_the_images_as_its_processor_would(tiny_vit):
    from fedlora.data import DATASETS

    hf = load_classifier(tiny_vit, 10, seed=0, image=True)
    assert hf.classifier.out_features == 10  # ImageNet's 1000-class head replaced, from the seed
    assert torch.equal(hf.classifier.weight, load_classifier(tiny_vit, 10, seed=0, image=True).classifier.weight)
    info = DATASETS["fmnist"]
    model = image_classifier(hf, tiny_vit, info.mean, info.std).eval()
    raw = torch.rand(3, 1, 28, 28)  # images on the 0..1 scale
    x = (raw - info.mean[0]) / info.std[0]  # as fedlora's data loader normalises Fashion-MNIST
    pixels = F.interpolate((raw.expand(-1, 3, -1, -1) - 0.5) / 0.5, size=(32, 32), mode="bilinear",
                           align_corners=False)  # as the checkpoint's processor would, at its size
    assert torch.allclose(model(x), hf(pixel_values=pixels).logits, atol=1e-5)
    assert not {"scale", "shift"} & set(model.state_dict())  # the conversion never travels


def test_image_peft_export_round_trip_gives_the_same_logits(tiny_vit, tmp_path):
    from peft import PeftModel

    hf = load_classifier(tiny_vit, 10, seed=0, image=True)
    inject_adapters(hf, lora(4, 8.0, ["q_proj", "v_proj"]))
    reset_deltas(hf, 1)
    with torch.no_grad():
        for _, layer in delta_layers(hf):
            layer.delta.lora_B.normal_(0, 0.1)
    pixels = torch.randn(2, 3, 32, 32)
    ours = hf.eval()(pixel_values=pixels).logits
    export_peft_lora(hf, tmp_path, load_classifier(tiny_vit, 10, seed=0, image=True), tiny_vit, ["q_proj", "v_proj"],
                     ["classifier"], task="image")
    loaded = PeftModel.from_pretrained(load_classifier(tiny_vit, 10, seed=5, image=True), str(tmp_path)).eval()
    assert torch.allclose(ours, loaded(pixel_values=pixels).logits, atol=1e-5)
