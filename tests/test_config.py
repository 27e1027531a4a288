"""Config validation: every user mistake ends in a short message naming the valid choices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import compose, resolve
from fedlora.errors import ConfigError, FedloraError

CLI = str(Path(sys.executable).with_name("fedlora-sim"))


def resolved(*overrides):
    return resolve(compose(list(overrides)))


def test_default_config_is_the_issue_default():
    cfg = resolved()
    assert (cfg.dataset.name, cfg.model.name, cfg.method.name) == ("fmnist", "fmnist_cnn", "fedavg")
    assert (cfg.num_clients, cfg.clients_per_round, cfg.partition.name, cfg.partition.alpha) == (20, 5, "dirichlet", 0.3)


def test_model_defaults_to_the_papers_model_for_the_dataset(tmp_path):
    assert resolved("dataset=cifar10").model.name == "vgg_cifar"
    # no CIFAR-100 or SVHN files here: download=true defers the check to the download
    later = ["data.download=true", f"data.root={tmp_path}"]
    assert resolved("dataset=cifar100", *later).model.name == "vgg_cifar"
    assert resolved("dataset=svhn", *later).model.name == "svhn_cnn"
    assert resolved("dataset=cifar10", "model=resnet18").model.name == "resnet18"


@pytest.mark.parametrize("overrides, words", [
    (["dataset.name=mnist"], ["unknown dataset 'mnist'", "cifar10", "fmnist"]),
    (["model.name=swin"], ["unknown model 'swin'", "resnet18", "vgg_cifar", "vit"]),
    (["method.name=fedfoo"], ["unknown method 'fedfoo'", "fedavg, fedex_lora, fedit", "fedmud_bkd_aad"]),
    (["method=fedmud", "method.strategy=fedavg"], ["method.strategy is not a setting of method=fedmud",
                                                   "compression_ratio", "interval"]),
    (["method=fedmud", "+method.strategy=fedavg"], ["method=fedmud has no setting 'strategy'"]),
    (["method=fedmud", "method.interval=often"], ["method=fedmud", "could not be converted to Integer"]),
    (["method=fedmud", "method.compression_ratio=2"], ["method.compression_ratio must be in (0, 1)"]),
    (["method=fedmud", "method.interval=0"], ["method.interval must be >= 1"]),
    (["method=fedmud", "method.downlink=sometimes"], ["method.downlink must be global or broadcast_update"]),
    (["method=fedlmt", "method.downlink=broadcast_update"], ["method.downlink is not a setting of method=fedlmt",
                                                             "compression_ratio, dense_first_last"]),
    (["dataset=agnews", "adapter=lora", "adapter.blocks=2"], ["adapter.blocks is not a setting of adapter=lora"]),
    (["dataset=agnews", "adapter=lora", "method=lora_fair", "method.fair_steps=0"], ["method.fair_steps >= 1"]),
    (["dataset=agnews", "adapter=bora", "method=flexlora"], ["adapter=bora is not one of them: use adapter=lora or lora_nonzero"]),
    (["dataset=agnews"], ["fine-tuned through adapters", "adapter=lora"]),
    (["dataset=agnews", "model=fmnist_cnn"], ["dataset 'agnews' is text", "model=minilm"]),
    (["adapter=lora"], ["adapter=lora fine-tunes a pretrained model"]),
    (["model=minilm", "adapter=lora"], ["'minilm' is a pretrained text model", "model=vit"]),
    (["dataset=agnews", "model=vit", "adapter=lora"], ["'vit' is a pretrained image model", "model=minilm"]),
    (["model=vit"], ["fine-tuned through adapters: add adapter=lora"]),
    (["dataset=agnews", "adapter=lora", "method=fedmud"], ["method=fedmud trains a model from scratch",
                                                           "method=fedit", "method=ffa_lora", "method=flexlora"]),
    (["dataset=agnews", "adapter=lora", "method=fedavg"], ["method=fedavg trains a model from scratch"]),
    (["method=ffa_lora"], ["method=ffa_lora aggregates adapters"]),
    (["dataset=agnews", "adapter=lora", "adapter.init=random"], ["adapter.init must be zero or nonzero"]),
    (["dataset=agnews", "adapter=bora", "adapter.blocks=0"], ["adapter.blocks must be >= 1"]),
    (["local.optimizer=adam"], ["local.optimizer must be sgd or adamw"]),
    (["partition.name=shards"], ["unknown partition 'shards'", "dirichlet", "label_count"]),
    (["partition.alpha=0"], ["partition.alpha must be > 0"]),
    (["partition.alpha=-1"], ["partition.alpha must be > 0"]),
    (["partition=label_count", "partition.classes_per_client=11"], ["classes_per_client", "between 1 and 10"]),
    (["clients_per_round=21"], ["clients_per_round must be between 1 and num_clients=20"]),
    (["num_rounds=0"], ["num_rounds must be >= 1"]),
    (["local.lr=0"], ["local.lr must be > 0"]),
    (["model=vgg_cifar"], ["takes (3, 32, 32) inputs", "'fmnist'"]),
    (["data.train_samples=10"], ["fewer than num_clients=20"]),
    (["seed=-1"], ["seed must be >= 0"]),
    (["eval.batch_size=0"], ["eval.batch_size must be >= 1"]),
    (["simulation.round_timeout=0"], ["simulation.round_timeout must be > 0"]),
    (["simulation.client_resources.num_gpus=lots"], ["num_gpus must be 'auto' or a number"]),
])
def test_bad_values_are_named(overrides, words):
    with pytest.raises(ConfigError) as e:
        resolved(*overrides)
    for w in words:
        assert w in str(e.value)


def test_unknown_group_option_names_the_choices():
    with pytest.raises(ConfigError) as e:
        compose(["dataset=mnist"])
    assert "fmnist" in str(e.value) and "cifar10" in str(e.value)


def test_unknown_key_and_wrong_type_are_rejected():
    with pytest.raises(ConfigError, match="local.nonsense"):
        compose(["local.nonsense=1"])
    # what a data set is (classes, shapes) is not for a config to change
    with pytest.raises(ConfigError, match="dataset.num_classes"):
        compose(["dataset.num_classes=5"])
    with pytest.raises(ConfigError, match="local.epochs=abc.*could not be converted to Integer"):
        compose(["local.epochs=abc"])


def test_missing_data_root_says_where_and_how(tmp_path, monkeypatch):
    from fedlora.preflight import preflight

    monkeypatch.delenv("FEDLORA_DATA")
    with pytest.raises(FedloraError, match="no data root is set"):
        preflight(resolved())
    with pytest.raises(FedloraError) as e:
        preflight(resolved(f"data.root={tmp_path}"))
    msg = str(e.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg and "data.download=true" in msg
    with pytest.raises(FedloraError, match="does not exist"):
        preflight(resolved(f"data.root={tmp_path}/nowhere"))


TEXT = ["dataset=agnews", "model=minilm", "adapter=lora", "method=fedit", "model.num_layers=1"]


@pytest.mark.parametrize("overrides, words", [
    (TEXT + ["adapter.targets=[nothing]"], ["no Linear or Conv2d layer matches adapter.targets ['nothing']",
                                            "model.bert.encoder.layer.0"]),
    (TEXT + ["adapter.r=1000"], ["adapter.r=1000 must be between 1"]),
    (TEXT + ["adapter.train=[head]"], ["adapter.train ['head'] names no module"]),
    (TEXT + ["model.hf=org/not-on-this-machine"], ["cannot load model 'org/not-on-this-machine'", "offline"]),
])
def test_what_needs_a_model_is_checked_before_ray(overrides, words, tmp_path):
    """A config that composes and validates, but whose model the method cannot be applied to: the
    pre-flight step builds it and says what is wrong."""
    from fedlora.preflight import preflight

    cfg = resolved(*overrides, f"data.cache_dir={tmp_path}")
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("args, code, words", [
    (["dataset=mnist"], 1, ["fmnist", "cifar10"]),  # Hydra's own message for a group option
    (["partition.alpha=0"], 2, ["partition.alpha must be > 0"]),
    (["clients_per_round=50"], 2, ["clients_per_round must be between 1 and num_clients=20"]),
    (["data.root=/nonexistent/data"], 2, ["/nonexistent/data", "FEDLORA_DATA"]),
])
def test_cli_mistakes_exit_without_traceback(args, code, words, tmp_path):
    sessions = set(Path("/tmp/ray").glob("session_*"))
    proc = subprocess.run([CLI, *args, f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert proc.returncode == code
    assert "Traceback" not in proc.stderr + proc.stdout
    for w in words:
        assert w in proc.stderr
    assert set(Path("/tmp/ray").glob("session_*")) == sessions  # stopped before Ray started


def test_server_app_reads_the_same_config_from_json_or_overrides():
    from fedlora.config import to_json
    from strategies.server_app import config_from_run_config

    cfg = resolved("num_clients=7", "partition=iid")
    assert config_from_run_config({"fedlora-config": to_json(cfg)}) == cfg
    assert config_from_run_config({"overrides": "num_clients=7 partition=iid"}) == cfg
    # as `flwr run` passes them: the config name, and overrides quoted as on a shell command line
    quoted = resolved("num_clients=7", "partition=iid", "data.cache_dir=/tmp/two words")
    assert config_from_run_config({"config-name": "config",
                                   "overrides": "num_clients=7 partition=iid 'data.cache_dir=/tmp/two words'"}) == quoted
    with pytest.raises(FedloraError, match="cannot be split"):
        config_from_run_config({"overrides": "data.cache_dir='unclosed"})
    with pytest.raises(ConfigError):
        config_from_run_config({"config-name": "nosuchconfig", "overrides": ""})


def test_a_relative_data_root_is_resolved_once_against_the_working_directory(tmp_path, monkeypatch):
    data = os.environ["FEDLORA_DATA"]
    monkeypatch.chdir(Path(data).parent)
    monkeypatch.setenv("FEDLORA_DATA", Path(data).name)
    assert resolved().data.root == data  # absolute: the config that travels means the same everywhere
    assert resolved("data.cache_dir=cache").data.cache_dir == str(Path(data).parent / "cache")
    monkeypatch.chdir(tmp_path)
    for args, given in (([], "FEDLORA_DATA ../shared/data"), (["data.root=../shared/data"], "data.root ../shared/data")):
        monkeypatch.setenv("FEDLORA_DATA", "../shared/data")
        with pytest.raises(FedloraError) as e:
            resolved(*args)
        # the path as given, the folder it was resolved against, and what to do
        assert given in str(e.value) and f"against {tmp_path}" in str(e.value)
        assert str(tmp_path.parent / "shared" / "data") in str(e.value) and "absolute path" in str(e.value)


def test_a_nodes_relative_paths_are_resolved_against_its_own_folder(tmp_path, monkeypatch):
    from flwr.app import Context, RecordDict

    from clients.client_app import _training_data

    cfg = resolved()
    monkeypatch.chdir(tmp_path)
    for key in ("data-root", "local-data"):
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, key: "data"}, state=RecordDict(),
                          run_config={})
        with pytest.raises(FedloraError, match=f"node config {key} data does not exist.*against {tmp_path}"):
            _training_data(cfg.copy(), context, 0)


def test_a_node_that_lost_the_runs_config_says_so_and_keeps_it_when_sent_again():
    """The run's config reaches a node once, in the query that opens the run: a node that restarted
    later has none, and refuses to train instead of guessing, until a message brings it again."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from clients.client_app import _run_of
    from fedlora.config import to_json
    from fedlora.protocol import CONFIG, NO_CONFIG

    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=f"{NO_CONFIG}.*restarted"):
        _run_of(context, ConfigRecord({"round": 3}))
    cfg = resolved("num_clients=7")
    assert _run_of(context, ConfigRecord({"round": 3, CONFIG: to_json(cfg)})).cfg == cfg
    assert _run_of(context, ConfigRecord({"round": 4})).cfg == cfg  # kept in the node state


def test_a_model_folder_of_ones_own_must_exist_and_gets_a_text_length(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.hf=/nonexistent does not exist as a folder.*or a Hub id"):
        resolved("dataset=agnews", "method=fedit", "model.hf=/nonexistent")
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = resolved("dataset=agnews", "method=fedit", "model.hf=./mine")
    assert cfg.model.hf == str(tmp_path / "mine") and cfg.model.max_length == 128  # absolute; MiniLM's length
    assert resolved("dataset=agnews", "method=fedit", "model.hf=org/name").model.hf == "org/name"  # a Hub id
