"""Data loading and caching, and the paper's models."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora import data
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


def test_the_cache_is_shared_as_a_memory_map_and_a_damaged_entry_is_decoded_again(tmp_path, monkeypatch):
    decoded = load_split("fmnist", ROOT, "test", cache_dir=str(tmp_path))
    (cache_file,) = Path(tmp_path).iterdir()
    load_split.cache_clear()
    cached = load_split("fmnist", ROOT, "test", cache_dir=str(tmp_path))
    # mapped from the file (the page cache, shared by the processes of a run), not read into memory
    assert str(cache_file.resolve()) in Path("/proc/self/maps").read_text()
    assert np.array_equal(cached.inputs, decoded.inputs) and np.array_equal(cached.labels, decoded.labels)
    cached.inputs[0] = 0  # copy-on-write: the process's own page, the file unchanged
    with np.load(cache_file) as z:
        assert np.array_equal(z["images"][0], decoded.inputs[0])
    def no_map(path):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(data, "read_npz_mapped", no_map)  # no map to be had: read, the entry kept
    load_split.cache_clear()
    stamp = cache_file.stat().st_mtime_ns
    assert np.array_equal(load_split("fmnist", ROOT, "test", cache_dir=str(tmp_path)).inputs, decoded.inputs)
    assert cache_file.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    cache_file.write_bytes(cache_file.read_bytes()[:100_000])  # cut short
    load_split.cache_clear()
    again = load_split("fmnist", ROOT, "test", cache_dir=str(tmp_path))
    assert np.array_equal(again.inputs, decoded.inputs)
    with np.load(cache_file) as z:  # written again, whole
        assert np.array_equal(z["labels"], decoded.labels)
    load_split.cache_clear()


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


def test_a_process_hands_back_what_training_freed_once_idle():
    """glibc's allocator keeps what a training freed; fedlora.training hands it back once the process
    has been idle for a while (not at once: the next client of a round would fault it in again). In a
    process of its own, so that nothing else allocates."""
    code = """
import time, torch
from omegaconf import OmegaConf
from fedlora.training import hands_back_freed_memory, train_local
def anon():
    return sum(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("Anonymous:")) / 1024
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1),
                            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 28 * 28, 10))
x, y = torch.randn(1024, 1, 28, 28), torch.randint(0, 10, (1024,))
local = OmegaConf.create(dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, epochs=1, batch_size=64))
train_local(model, x, y, local, seed=0)
trained = anon()
time.sleep(hands_back_freed_memory.after / 2)
soon = anon()
time.sleep(hands_back_freed_memory.after + 0.5)
print(trained, soon, anon())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    trained, soon, idle = map(float, out.stdout.split())
    assert soon > trained - 5  # kept while the next client could still come
    assert idle < trained - 20  # MB handed back


@pytest.mark.parametrize("method", ["fedavg", "fedmud_bkd_aad"])
def test_images_train_channels_last_on_a_cpu_and_the_model_is_handed_back_in_the_default_layout(method, monkeypatch):
    """fedlora.training trains and evaluates a model of images on a CPU in the channels-last layout
    (faster: benchmarks/README.md, fix 10): its convolutions give channels-last maps, every weight is
    back in PyTorch's default layout afterwards, and the result is the default layout's up to
    floating-point rounding."""
    import contextlib

    from fedlora import training
    from fedlora.config import compose, resolve
    from fedlora.methods import make_method

    cfg = resolve(compose([f"method={method}", "local.epochs=1", "local.batch_size=32"]))
    m = make_method(cfg)
    fast, plain = m.initial_model(), m.initial_model()
    for model in (fast, plain):
        m.start_round(model, 1)
        m.set_trainable(model, 1)
    initial = {k: v.clone() for k, v in plain.state_dict().items()}
    seen = []
    last = torch.channels_last
    for norm in (n for n in fast.modules() if isinstance(n, torch.nn.BatchNorm2d)):  # what each convolution gave
        norm.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous(memory_format=last)))
    g = torch.Generator().manual_seed(0)
    x, y, cpu = torch.randn(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g), torch.device("cpu")
    fast_loss = training.train_local(fast, x, y, cfg.local, seed=0, device=cpu)
    trained = len(seen)
    fast_eval = training.evaluate(fast, x, y, 32, cpu)
    assert trained > 0 and len(seen) > trained and all(seen)
    for name, p in fast.state_dict().items():
        assert p.is_contiguous(), name
    monkeypatch.setattr(training, "images_channels_last", lambda *_: contextlib.nullcontext(False))
    plain_eval = training.evaluate(fast, x, y, 32, cpu)  # the same model in the default layout
    assert fast_eval[1] == pytest.approx(plain_eval[1], rel=1e-5) and abs(fast_eval[0] - plain_eval[0]) <= 1 / 96
    plain_loss = training.train_local(plain, x, y, cfg.local, seed=0, device=cpu)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-3)
    # The two trainings differ by far less than what they changed: rounding (which can move a
    # max-pooling's pick, and so a few steps' gradients), not a training gone astray.
    floats = [k for k, v in initial.items() if v.is_floating_point()]
    apart = sum(float((fast.state_dict()[k] - plain.state_dict()[k]).norm() ** 2) for k in floats) ** 0.5
    changed = sum(float((plain.state_dict()[k] - initial[k]).norm() ** 2) for k in floats) ** 0.5
    assert changed > 0 and apart <= 0.2 * changed, (apart, changed)


def test_the_evaluation_is_the_same_at_any_batch_size():
    """The default eval.batch_size (128, faster than 1000 on CPUs: benchmarks/README.md, fix 11) only
    splits the evaluation: every example counted once, the last batch short, the same accuracy and,
    up to the rounding of its sums, the same loss."""
    from fedlora.config import compose, resolve
    from fedlora.methods import make_method
    from fedlora.training import evaluate

    cfg = resolve(compose([]))
    assert cfg.eval.batch_size == 128
    model = make_method(cfg).initial_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 1, 28, 28, generator=g), torch.randint(0, 10, (300,), generator=g)
    whole = evaluate(model, x, y, 1000, torch.device("cpu"))
    per_example = evaluate(model, x, y, 1, torch.device("cpu"))
    for size in (128, 7):
        acc, loss = evaluate(model, x, y, size, torch.device("cpu"))
        assert acc == whole[0] == per_example[0] and loss == pytest.approx(whole[1], rel=1e-5)
    logits = model.eval()(x)
    assert whole[0] == int((logits.argmax(1) == y).sum()) / len(y)


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
