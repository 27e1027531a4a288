"""Partition statistics on the real Fashion-MNIST labels."""

import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedlora.errors import ConfigError
from fedlora.data import load_split
from fedlora.partition import class_histogram, partition_indices


@pytest.fixture(scope="module")
def labels():
    return load_split("fmnist", os.environ["FEDLORA_DATA"], "train").labels


def pcfg(**kw):
    base = {"name": "dirichlet", "alpha": 0.3, "min_partition_size": 10, "classes_per_client": 3}
    return OmegaConf.create({**base, **kw})


def skew(labels, parts):
    """Mean total-variation distance between each client's label distribution and the global one."""
    hist = np.array(class_histogram(labels, parts, 10), float)
    local = hist / hist.sum(1, keepdims=True)
    glob = np.bincount(labels, minlength=10) / len(labels)
    return 0.5 * np.abs(local - glob).sum(1).mean()


def check_disjoint_cover(parts, n):
    """No row in two partitions, and every row in one."""
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == n


def test_iid_is_balanced_and_unskewed(labels):
    parts = partition_indices(labels, 20, pcfg(name="iid"), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(labels)
    check_disjoint_cover(parts, len(labels))
    assert skew(labels, parts) < 0.05


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    s = {a: skew(labels, partition_indices(labels, 20, pcfg(alpha=a), seed=0)) for a in (0.1, 0.3, 100.0)}
    assert s[0.1] > s[0.3] > 0.3 > 0.1 > s[100.0]


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_respects_min_size_and_is_seeded(labels):
    parts = partition_indices(labels, 100, pcfg(alpha=0.3, min_partition_size=50), seed=1)
    assert min(len(p) for p in parts) >= 50
    check_disjoint_cover(parts, len(labels))
    again = partition_indices(labels, 100, pcfg(alpha=0.3, min_partition_size=50), seed=1)
    other = partition_indices(labels, 100, pcfg(alpha=0.3, min_partition_size=50), seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("k", [1, 3])
def test_label_count_gives_exactly_k_classes(labels, k):
    parts = partition_indices(labels, 30, pcfg(name="label_count", classes_per_client=k), seed=0)
    hist = np.array(class_histogram(labels, parts, 10))
    assert ((hist > 0).sum(1) == k).all()
    check_disjoint_cover(parts, len(labels))  # every class is used, no sample left out


@pytest.mark.filterwarnings("ignore:Classes:")
def test_label_count_says_when_classes_are_left_out(labels, caplog):
    with caplog.at_level("WARNING", logger="fedlora"):
        parts = partition_indices(labels, 2, pcfg(name="label_count", classes_per_client=2), seed=0)
    used = np.concatenate(parts)
    assert len(used) == 4 * 6000  # two clients, two classes each, 6,000 samples a class
    assert "36000 of 60000 samples" in caplog.text


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_too_many_clients_for_the_data_is_a_config_error(labels):
    with pytest.raises(ConfigError, match="cannot partition|without data"):
        partition_indices(labels[:50], 20, pcfg(alpha=0.1, min_partition_size=10), seed=0)


def test_partition_shard_deals_equal_label_sorted_shards():
    labels = np.repeat(np.arange(10), 60)  # 600 rows, 10 classes
    parts = partition_indices(labels, 10, pcfg(name="shard", shards_per_client=2), seed=0)
    assert [len(p) for p in parts] == [60] * 10  # 20 shards of 30 rows, two each
    assert len(np.unique(np.concatenate(parts))) == 600
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)  # a shard holds one class here


def test_partition_shard_with_more_shards_than_samples_is_a_config_error():
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="48 samples cannot make 3 x 40 shards .*shards_per_client=16 or less"):
        partition_indices(np.repeat(np.arange(3), 16), 3, pcfg(name="shard", shards_per_client=40), seed=0)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_partitions_kept_on_disk_are_read_back_without_the_partitioners(labels, tmp_path):
    import subprocess
    import sys

    parts = partition_indices(labels, 50, pcfg(alpha=0.3), seed=4, cache_dir=tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_indices(labels, 50, pcfg(alpha=0.3), seed=4)))
    files = list(tmp_path.glob("partitions-*.npz"))
    assert len(files) == 1
    files[0].write_bytes(b"not a zip")  # an unreadable file: computed and written again
    again = partition_indices(labels, 50, pcfg(alpha=0.3), seed=4, cache_dir=tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again)) and files[0].stat().st_size > 100
    # another seed, another client count, other labels: other files
    partition_indices(labels, 50, pcfg(alpha=0.3), seed=5, cache_dir=tmp_path)
    partition_indices(labels, 40, pcfg(alpha=0.3), seed=4, cache_dir=tmp_path)
    partition_indices(labels[::-1].copy(), 50, pcfg(alpha=0.3), seed=4, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("partitions-*.npz"))) == 4
    # a process that finds them reads them, and imports none of what computing them needs
    np.save(tmp_path / "labels.npy", labels)
    code = ("import sys, numpy as np; from omegaconf import OmegaConf; from fedlora.partition import partition_indices; "
            f"p = partition_indices(np.load({str(tmp_path / 'labels.npy')!r}), 50, OmegaConf.create({dict(pcfg(alpha=0.3))!r}), "
            f"seed=4, cache_dir={str(tmp_path)!r}); "
            "print(sum(len(x) for x in p), sorted({'datasets', 'flwr_datasets', 'pandas', 'scipy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(sum(len(p) for p in parts)), "[]"]
