"""Data loading and caching, and the paper's models."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.data import DataError, load_split, to_tensors
from fedlora.models import MODELS, build_model

ROOT = os.environ["FEDLORA_DATA"]


def test_fmnist_from_the_offline_idx_files(tmp_path):
    train = load_split("fmnist", ROOT, "train", cache_dir=str(tmp_path))
    test = load_split("fmnist", ROOT, "test", cache_dir=str(tmp_path))
    assert train.inputs.shape == (60000, 1, 28, 28) and train.inputs.dtype == np.uint8
    assert test.inputs.shape == (10000, 1, 28, 28)
    assert (np.bincount(test.labels) == 1000).all()
    cached = sorted(p.name for p in Path(tmp_path).iterdir())
    assert len(cached) == 2 and all(name.startswith("fmnist-") for name in cached)


def test_decoded_once_then_read_from_the_cache(tmp_path):
    first = load_split("cifar10", ROOT, "test", cache_dir=str(tmp_path))
    assert first.inputs.shape == (10000, 3, 32, 32) and set(np.unique(first.labels)) == set(range(10))
    (cache_file,) = Path(tmp_path).iterdir()
    load_split.cache_clear()
    stamp = cache_file.stat().st_mtime_ns
    again = load_split("cifar10", ROOT, "test", cache_dir=str(tmp_path))
    assert cache_file.stat().st_mtime_ns == stamp  # not rewritten
    assert np.array_equal(first.inputs, again.inputs) and np.array_equal(first.labels, again.labels)
    # JPEG-stored CIFAR-10 keeps the original per-channel means to within 0.1 of 255
    means = again.inputs.reshape(10000, 3, -1).mean((0, 2)) / 255
    assert np.allclose(means, [0.4914, 0.4822, 0.4465], atol=0.02)


def test_missing_dataset_says_where(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_split("cifar10", str(tmp_path), "train")


def test_a_damaged_fashion_mnist_file_is_named_with_how_to_get_a_good_copy(tmp_path):
    import gzip
    import shutil

    src = Path(ROOT) / "fashion-mnist"
    for cut in ("gzip", "idx"):  # a .gz cut short; an uncompressed IDX file shorter than its header says
        root = tmp_path / cut / "fashion-mnist"
        root.mkdir(parents=True)
        for name in ("t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"):
            shutil.copy(src / name, root / name)
        images = gzip.decompress((src / "t10k-images-idx3-ubyte.gz").read_bytes())
        if cut == "gzip":
            (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images)[:100_000])
        else:
            (root / "t10k-images-idx3-ubyte").write_bytes(images[:-784])
        with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte(\.gz)? is damaged .*download it again"):
            load_split("fmnist", str(tmp_path / cut), "test", cache_dir=str(tmp_path / "cache"))


def test_a_client_process_reads_its_data_once():
    from fedlora.config import compose, resolve
    from fedlora.federated_data import client_tensors

    cfg = resolve(compose(["num_clients=4", "clients_per_round=2", "data.train_samples=800"]))
    load_split.cache_clear()
    first = client_tensors(cfg, 1)
    assert client_tensors(cfg, 1) is first  # the next rounds reuse the tensors
    assert load_split.cache_info().misses == 2  # train and test, decoded once each


def test_normalised_tensors():
    split = load_split("fmnist", ROOT, "test")
    x, y = to_tensors(split, "fmnist", np.arange(2000))
    assert x.shape == (2000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


@pytest.mark.parametrize("name, classes, head_in", [
    ("fmnist_cnn", 10, 256), ("svhn_cnn", 10, 1024), ("vgg_cifar", 100, 512), ("resnet18", 10, 512)])
def test_models_shapes_and_layers(name, classes, head_in):
    model = build_model(name, classes, seed=0)
    shape = MODELS[name].input_shape
    out = model(torch.zeros(2, *shape))
    assert out.shape == (2, classes)
    assert model.classifier.in_features == head_in
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    if name in ("fmnist_cnn", "svhn_cnn"):
        assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    if name == "vgg_cifar":
        assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128, 256, 256, 512, 512]
    if name == "resnet18":
        assert 11_000_000 < sum(p.numel() for p in model.parameters()) < 11_300_000


def test_initialisation_is_seeded():
    a, b, c = (build_model("fmnist_cnn", 10, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
