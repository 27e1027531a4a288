"""dataset=hf: a user's own text classification data in CSV, TSV, JSON lines, Parquet, a save_to_disk
folder or a folder of files by split, read through `datasets`; labels by ClassLabel or by sorted
value; bad input named before Ray starts; and a short real run on a CSV file. Every file here is
written by the test; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import metrics_rows
from fedlora.config import compose, resolve
from fedlora.errors import ConfigError, DataError

BASE = ["dataset=hf", "model.num_layers=2", "model.max_length=32", "adapter=lora", "method=fedit", "num_clients=4",
        "clients_per_round=2", "num_rounds=2", "local.batch_size=16"]


def agnews_rows(n: int, start: int = 0) -> list[tuple[str, str]]:
    """(text, label name) pairs of real AG News training lines."""
    import os

    path = Path(os.environ["FEDLORA_DATA"]) / "agnews" / "dev.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()[start:start + n]
    return [("\t".join(parts[:-1]), parts[-1]) for parts in (line.split("\t") for line in lines)]


def write(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":  # as such files are: a header, then fields between tabs, nothing quoted
        lines = ["\t".join(frame.columns)] + ["\t".join(str(v) for v in row) for row in frame.itertuples(index=False)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


def config(*extra: str):
    return resolve(compose(BASE + list(extra)))


def read(*extra: str):
    from fedlora.own_data import read_own

    return read_own(config(*extra))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_file_format_gives_the_same_texts_and_string_labels_in_sorted_order(tmp_path, suffix):
    rows = [{"text": t.replace("\t", " "), "label": y} for t, y in agnews_rows(60)]
    path = write(tmp_path / f"news{suffix}", rows)
    data = read(f"dataset.path={path}")
    assert data.label_names == tuple(sorted({r["label"] for r in rows}))
    assert len(data.train_labels) == 48 and len(data.test_labels) == 12  # a seeded 20% held out
    by_text = {r["text"]: data.label_names.index(r["label"]) for r in rows}
    texts = data.train_texts[0] + data.test_texts[0]
    assert sorted(texts) == sorted(by_text)
    assert [by_text[t] for t in data.train_texts[0]] == data.train_labels.tolist()


def test_the_hold_out_is_the_same_for_every_seed_and_a_named_test_split_is_used_as_is(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    rows = [{"text": t, "label": y} for t, y in agnews_rows(50)]
    write(folder / "train.csv", rows[:40])
    write(folder / "test.csv", rows[40:])
    data = read(f"dataset.path={folder}", "dataset.test_split=test")
    assert list(data.test_texts[0]) == [r["text"] for r in rows[40:]] and len(data.train_labels) == 40
    one = read(f"dataset.path={folder}", "seed=1")
    assert len(one.test_labels) == 8 and read(f"dataset.path={folder}", "seed=2").test_texts == one.test_texts


def test_a_save_to_disk_folder_with_classlabel_names_and_sentence_pairs(tmp_path):
    import datasets

    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    rows = agnews_rows(30)
    split = {"premise": [t for t, _ in rows], "hypothesis": [t[::-1] for t, _ in rows], "label": [i % 3 for i in range(30)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(split, features=features),
                          "validation": datasets.Dataset.from_dict(split, features=features).select(range(10))}
                         ).save_to_disk(str(tmp_path / "nli"))
    cfg = config(f"dataset.path={tmp_path / 'nli'}", "dataset.test_split=validation", "dataset.text=[premise,hypothesis]")
    from fedlora.data import dataset_info, load_full
    from fedlora.own_data import read_own

    data = read_own(cfg)
    assert data.label_names == ("entailment", "neutral", "contradiction") and dataset_info(cfg).num_classes == 3
    assert data.train_labels.tolist() == [i % 3 for i in range(30)] and len(data.train_texts) == 2
    tokens = load_full(cfg, "train").inputs
    from transformers import AutoTokenizer

    from fedlora.hf import model_path

    tok = AutoTokenizer.from_pretrained(model_path(cfg.model.hf))
    sep = tok.sep_token_id
    first = tokens[0, 0][tokens[0, 1] == 1]
    assert (first == sep).sum() == 2  # [CLS] premise [SEP] hypothesis [SEP]: the pair, joined by the tokenizer


def test_integer_labels_that_are_not_0_to_k_are_mapped_in_sorted_order(tmp_path):
    rows = [{"text": t, "label": [3, 7, 11][i % 3]} for i, (t, _) in enumerate(agnews_rows(30))]
    data = read(f"dataset.path={write(tmp_path / 'ints.csv', rows)}")
    assert data.label_names == ("3", "7", "11")
    assert set(data.train_labels.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("make, extra, message", [
    (None, [], "dataset=hf needs dataset.path"),
    (None, ["dataset.path=/nowhere/data.csv"], "does not exist"),
    ("floats", [], "no column 'text'; its columns: sentence, score"),
    ("floats", ["dataset.text=sentence", "dataset.label=score"], "holds float values; labels must be integers or strings"),
    ("header", [], "holds no rows"),
    ("three", [], "3 training examples for num_clients=4"),
    ("three", ["dataset.test_split=test"], "has no split 'test'; it has: train"),
    ("three", ["dataset.text=[text,label,text]"], "dataset.text must name a text column, or two"),
    ("one_class", [], "hold 1 class; classification needs two or more"),
    ("unseen", ["dataset.test_split=test"], "the test split's label 'z' is in no training example"),
    ("unlabelled", ["dataset.test_split=test"], "label -1 is none of the 2 classes"),
])
def test_bad_own_data_is_named_before_ray_starts(tmp_path, make, extra, message):
    from fedlora.preflight import preflight

    files = {"floats": [{"sentence": "a b", "score": 0.5}, {"sentence": "c", "score": 1.5}] * 5,
             "three": [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}, {"text": "e", "label": "x"},
                       {"text": "f", "label": "y"}],
             "header": None}
    files["one_class"] = [{"text": f"t {i}", "label": "x"} for i in range(10)]
    if make == "header":
        (tmp_path / "header.csv").write_text("text,label\n")
        extra = [f"dataset.path={tmp_path / 'header.csv'}"] + extra
    elif make in ("unseen", "unlabelled"):  # a folder of two splits, whose test labels the training split lacks
        import datasets

        train = {"text": [f"t {i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
        if make == "unseen":
            (tmp_path / "splits").mkdir()
            write(tmp_path / "splits" / "train.csv", [{"text": t, "label": "xy"[y]} for t, y in zip(*train.values())])
            write(tmp_path / "splits" / "test.csv", [{"text": "u", "label": "z"}, {"text": "v", "label": "x"}])
        else:  # as a Hub data set's test split: ClassLabel, every row -1
            features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])})
            datasets.DatasetDict({"train": datasets.Dataset.from_dict(train, features=features),
                                  "test": datasets.Dataset.from_dict({"text": ["u"], "label": [-1]}, features=features)}
                                 ).save_to_disk(str(tmp_path / "splits"))
        extra = [f"dataset.path={tmp_path / 'splits'}"] + extra
    elif make is not None:
        extra = [f"dataset.path={write(tmp_path / f'{make}.csv', files[make])}"] + extra
    with pytest.raises((ConfigError, DataError), match=message):
        preflight(config(*extra))


def test_a_hub_id_offline_says_it_needs_internet_or_a_local_path(monkeypatch):
    from fedlora.own_data import read_own

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="Hub id it needs internet"):
        read_own(config("dataset.path=someone/reviews"))


def test_a_short_run_on_a_csv_file_of_ones_own(ray_address, tmp_path):
    from fedlora.simulation import run_simulation

    rows = [{"text": t, "label": y} for t, y in agnews_rows(500)]
    path = write(tmp_path / "news.csv", rows)
    cfg = resolve(compose(BASE + [f"dataset.path={path}", "data.test_samples=100",
                                  f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["labels"] == sorted({r["label"] for r in rows})
    out = metrics_rows(tmp_path / "run")
    assert [r["round"] for r in out] == [1, 2] and all(np.isfinite(r["test_loss"]) for r in out)
    assert sum(json.loads((tmp_path / "run" / "partitions.json").read_text())["sizes"]) == 400  # 500, 20% held out


def test_partition_natural_gives_one_client_per_value_of_a_column(tmp_path):
    from fedlora.federated_data import federated_data
    from fedlora.preflight import preflight

    rows = [{"text": t, "label": y, "writer": ["ann", "bob", "cy"][i % 3]} for i, (t, y) in enumerate(agnews_rows(90))]
    path = write(tmp_path / "writers.csv", rows)
    extra = [f"dataset.path={path}", "partition=natural", "partition.by=writer", "num_clients=3", "clients_per_round=2"]
    cfg = config(*extra)
    preflight(cfg)
    train, _, parts = federated_data(cfg)
    texts = read(*extra).train_texts[0]
    writer_of = {r["text"]: r["writer"] for r in rows}
    assert len(parts) == 3 and sum(len(p) for p in parts) == len(texts) == 72  # 90, a fifth held out
    assert all(len({writer_of[texts[i]] for i in p}) == 1 for p in parts)  # each client: one writer's texts
    assert len({writer_of[texts[p[0]]] for p in parts}) == 3
    with pytest.raises(ConfigError, match="hold 3 distinct values, 3 clients; set num_clients=3"):
        preflight(config(*extra[:3], "num_clients=4"))
    with pytest.raises(ConfigError, match="it needs dataset=hf and partition.by=COLUMN"):
        resolve(compose(["partition=natural", "partition.by=writer"]))



def image_folder(root: Path, grey: bool, sizes=(28,), per_class: int = 12) -> Path:
    """Sub-folders of PNG images, one per class, as a user keeps them: 'circle' bright in the centre,
    'frame' bright at the border, 'stripe' bright in the middle rows."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("circle", "frame", "stripe"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = sizes[i % len(sizes)]
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            c = size // 2
            if name == "circle":
                img[c - 4:c + 4, c - 4:c + 4] = 250
            elif name == "frame":
                img[:3], img[-3:], img[:, :3], img[:, -3:] = 250, 250, 250, 250
            else:
                img[c - 2:c + 2] = 250
            Image.fromarray(img if grey else np.stack([img] * 3, axis=-1)).save(root / name / f"{i}.png")
    return root


def test_an_image_folder_gives_classes_by_folder_and_picks_the_paper_cnn_of_its_shape(tmp_path):
    from fedlora.data import dataset_info, load_train_test

    folder = image_folder(tmp_path / "grey", grey=True)
    cfg = resolve(compose(["dataset=hf", f"dataset.path={folder}", "dataset.image=image", "method=fedavg",
                           "num_clients=3", "clients_per_round=2"]))
    assert cfg.model.name == "fmnist_cnn"  # (1, 28, 28): model=auto takes the paper CNN of that shape
    info = dataset_info(cfg)
    assert info.shape == (1, 28, 28) and info.num_classes == 3 and 0 < info.mean[0] < 1
    train, test = load_train_test(cfg)
    assert train.inputs.shape == (29, 1, 28, 28) and train.inputs.dtype == np.uint8 and len(test.labels) == 7
    from fedlora.own_data import read_own

    assert read_own(cfg).label_names == ("circle", "frame", "stripe")
    mixed = image_folder(tmp_path / "rgb", grey=False, sizes=(40, 36))
    base = ["dataset=hf", f"dataset.path={mixed}", "dataset.image=image", "method=fedavg", "num_clients=3",
            "clients_per_round=2"]
    with pytest.raises(DataError, match="images of 2 sizes .* set dataset.image_size=N"):
        resolve(compose(base))
    assert resolve(compose(base + ["dataset.image_size=32"])).model.name in ("svhn_cnn", "vgg_cifar", "resnet18")
    with pytest.raises(ConfigError, match=r"images of shape \(3, 40, 40\) fit none of the paper's CNNs"):
        resolve(compose(base + ["dataset.image_size=40"]))


def test_a_short_run_on_an_image_folder_of_ones_own(ray_address, tmp_path):
    from fedlora.simulation import run_simulation

    folder = image_folder(tmp_path / "shapes", grey=True, per_class=40)
    cfg = resolve(compose(["dataset=hf", f"dataset.path={folder}", "dataset.image=image", "method=fedavg",
                           "num_clients=3", "clients_per_round=2", "num_rounds=2", "local.batch_size=16",
                           "partition=iid", f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["labels"] == ["circle", "frame", "stripe"]
    rows = metrics_rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["test_accuracy"] > 1 / 3  # the shapes are learnable


def test_16_bit_and_palette_grey_images_are_read_as_grey_on_the_8_bit_scale():
    from PIL import Image

    from fedlora.own_data import _pixels, is_grey

    deep = Image.fromarray(np.array([[0, 32768], [65535, 16384]], np.uint16))
    assert is_grey(deep) and _pixels(deep, grey=True).tolist() == [[0, 127], [255, 63]]
    palette = Image.fromarray(np.array([[0, 128], [255, 64]], np.uint8)).convert("P")
    assert is_grey(palette) and not is_grey(Image.new("RGB", (2, 2), (10, 200, 30)).convert("P"))


def test_dataset_labels_fix_the_class_ids_and_name_a_label_outside_them(tmp_path):
    rows = [{"text": t, "label": y} for t, y in agnews_rows(40)]
    path = write(tmp_path / "news.csv", rows)
    order = ["World", "Sports", "Business", "Sci/Tech"]  # AG News's order, not the sorted one
    data = read(f"dataset.path={path}", f"dataset.labels=[{','.join(order)}]")
    assert data.label_names == tuple(order)
    by_text = {r["text"]: order.index(r["label"]) for r in rows}
    assert [by_text[t] for t in data.train_texts[0]] == data.train_labels.tolist()
    with pytest.raises(DataError, match=r"label '[A-Za-z/]+' is none of the run's 2 classes \(World, Sports\)"):
        read(f"dataset.path={path}", "dataset.labels=[World,Sports]")
    for bad in ("[World]", "[World,World]"):
        with pytest.raises(ConfigError, match="two or more distinct names"):
            config(f"dataset.path={path}", f"dataset.labels={bad}")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_nodes_own_file_is_all_training_data_under_the_runs_classes(tmp_path, suffix):
    """local-data under dataset=hf: the node's whole file, read with the run's columns, its labels
    mapped to the run's class ids by the names that the server sends (dataset.labels); a node may
    hold a single class, but not one outside the run's."""
    from fedlora.federated_data import local_tensors
    from fedlora.text import AGNEWS_LABELS

    rows = [{"text": t, "label": y} for t, y in agnews_rows(30)]
    mine = write(tmp_path / f"mine{suffix}", rows)
    cfg = config("dataset.path=/nowhere/the/servers.csv", f"dataset.labels=[{','.join(AGNEWS_LABELS)}]")
    x, y = local_tensors(cfg, str(mine))
    assert len(y) == 30 and y.tolist() == [AGNEWS_LABELS.index(r["label"]) for r in rows]
    assert x.shape[0] == 30
    one = write(tmp_path / f"one{suffix}", [r for r in rows if r["label"] == rows[0]["label"]])
    assert set(local_tensors(cfg, str(one))[1].tolist()) == {AGNEWS_LABELS.index(rows[0]["label"])}
    other = write(tmp_path / f"other{suffix}", [{"text": "a", "label": "Weather"}, {"text": "b", "label": "World"}])
    with pytest.raises(DataError, match=f"local-data {other}: .*label 'Weather' is none of the run's 4 classes"):
        local_tensors(cfg, str(other))


def test_a_server_with_the_nodes_own_data_reads_its_test_file_alone(tmp_path):
    """data.on_nodes=true: the server's dataset.path is a test file, all of it the test split, its
    classes those it shows (or dataset.labels); without a file, the clients must evaluate."""
    from fedlora.data import dataset_info
    from fedlora.federated_data import test_tensors

    rows = [{"text": t, "label": y} for t, y in agnews_rows(25)]
    test = write(tmp_path / "test.jsonl", rows)
    cfg = config(f"dataset.path={test}", "data.on_nodes=true")
    x, y = test_tensors(cfg)
    assert len(y) == 25 and dataset_info(cfg).num_classes == len({r["label"] for r in rows})
    from strategies.server_app import with_class_names

    assert with_class_names(cfg).dataset.labels == sorted({r["label"] for r in rows})
    with pytest.raises(ConfigError, match="the clients must evaluate"):
        config("data.on_nodes=true")
    with pytest.raises(ConfigError, match="name the run's classes with dataset.labels"):
        config("data.on_nodes=true", "eval.clients=true")
    nothing = config("data.on_nodes=true", "eval.clients=true", "dataset.labels=[a,b,c]")
    assert test_tensors(nothing) is None and dataset_info(nothing).num_classes == 3
    single = write(tmp_path / "single.csv", [{"text": "x", "label": "a"}, {"text": "y", "label": "a"}])
    with pytest.raises(DataError, match="shows 1 class: name the run's classes with dataset.labels"):
        test_tensors(config(f"dataset.path={single}", "data.on_nodes=true"))


def test_a_server_under_data_on_nodes_needs_only_a_built_in_data_sets_test_files(tmp_path):
    """Fashion-MNIST's t10k files alone: the server's test split under data.on_nodes; a run that
    needs the training split says which split it could not read."""
    import os
    import shutil

    from fedlora.federated_data import federated_data, test_tensors

    src = Path(os.environ["FEDLORA_DATA"]) / "fashion-mnist"
    (tmp_path / "fashion-mnist").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(src / name, tmp_path / "fashion-mnist" / name)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    x, y = test_tensors(resolve(compose([f"data.root={tmp_path}", "data.on_nodes=true", "data.test_samples=300", cache])))
    assert tuple(x.shape) == (300, 1, 28, 28) and len(y) == 300
    with pytest.raises(DataError, match="could not read the train split"):
        federated_data(resolve(compose([f"data.root={tmp_path}", cache, "num_clients=4", "clients_per_round=2"])))
