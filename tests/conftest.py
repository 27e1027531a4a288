"""Test session setup: offline Flower, the shared data root, and one Ray head for the whole session
(a fresh ray.init costs about eight seconds; the simulations of this process keep their connection
to it and their idle client actors from one run to the next, fedlora.simulation._KEPT)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedlora.paths import absolute
from local_flower import free_port

ROOT = Path(__file__).resolve().parents[1]

os.environ.update({
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DISABLE_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",  # pretrained models come from local paths and PyPI packages
})
os.environ.setdefault("FEDLORA_DATA", str(ROOT.parent / "shared" / "data"))
# Absolute before any process starts: a SuperLink or SuperNode that a test starts runs its apps in
# folders of its own, where the relative path of the README's test command means nothing.
for _var in ("FEDLORA_DATA", "FEDLORA_CACHE"):
    if os.environ.get(_var):
        os.environ[_var] = absolute(os.environ[_var], _var)


def pytest_sessionstart(session):
    data = Path(os.environ["FEDLORA_DATA"])
    if not (data / "fashion-mnist").is_dir():
        pytest.exit(f"the tests read real data: set FEDLORA_DATA to the shared data folder (tried {data})", 2)


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["FEDLORA_CACHE"] = str(path)
    return path


def wait_for_ray(address: str, proc: subprocess.Popen, deadline: float, showing: str = "") -> None:
    """Wait until `ray status` at address answers (and shows `showing`), while `proc` (the `ray start`
    that should get it there) runs."""
    ray = str(Path(sys.executable).with_name("ray"))
    while True:
        out = subprocess.run([ray, "status", f"--address={address}"], capture_output=True, text=True)
        if out.returncode == 0 and showing in out.stdout:
            return
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"Ray at {address} did not come up{' with ' + showing if showing else ''}")
        time.sleep(1)


@pytest.fixture(scope="session")
def ray_address(cache_dir):
    """Address of a Ray head of this test session's own (its own port and temp dir), stopped at the
    end by ending the `ray start --block` process that owns it: other Ray clusters here are left alone."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        wait_for_ray(address, head, time.time() + 120)
        yield address
    finally:
        from fedlora.simulation import release_ray

        release_ray()  # before the head goes: the actors and the connection the runs kept
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


# SMALL and TINY_TEXT evaluate 1000 examples at a time, as when the golden records (test_golden.py)
# were made; the default is 128 since fix 11 (benchmarks/README.md). The evaluation's batch changes
# only how the sums of the test loss round.
SMALL = ["num_clients=4", "clients_per_round=2", "num_rounds=2", "data.train_samples=1200",
         "data.test_samples=500", "local.batch_size=32", "eval.batch_size=1000"]


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory):
    """A small Vision Transformer checkpoint (random weights, ImageNet's 1000-class head, an image
    processor normalising to [-1, 1]) saved as a Hugging Face model folder: what `model.hf=PATH` loads,
    without a model hub."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=1000)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(str(path))
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(str(path))
    return str(path)


TINY_TEXT = ["dataset=agnews", "model.num_layers=2", "model.max_length=32", "data.train_samples=400",
             "data.test_samples=200", "local.batch_size=16", "num_clients=4", "clients_per_round=2", "num_rounds=2",
             "eval.batch_size=1000"]

# A short seeded run of every method preset: the image methods on Fashion-MNIST, the adapter methods on
# AG News with a 2-layer MiniLM. tests/test_golden.py holds each to its recorded metrics; other tests
# check what each sends on the same runs (`preset_run`), so that each runs once per session.
PRESETS = {
    "fedavg": SMALL + ["method=fedavg"],
    "fedmud": SMALL + ["method=fedmud"],
    "fedmud-broadcast": SMALL + ["method=fedmud", "method.downlink=broadcast_update"],
    "fedmud_bkd": SMALL + ["method=fedmud_bkd"],
    "fedmud_aad": SMALL + ["method=fedmud_aad"],
    "fedmud_bkd_aad": SMALL + ["method=fedmud_bkd_aad"],
    "fedmud_bkd_aad-broadcast": SMALL + ["method=fedmud_bkd_aad", "method.downlink=broadcast_update"],
    "fedmud_bkd_aad-interval2": SMALL + ["method=fedmud_bkd_aad", "method.interval=2"],
    "fedlmt": SMALL + ["method=fedlmt"],
    "fedpara": SMALL + ["method=fedpara"],
    "fedit-lora": TINY_TEXT + ["method=fedit", "adapter=lora"],
    "fedit-lora_nonzero": TINY_TEXT + ["method=fedit", "adapter=lora_nonzero"],
    "fedit-bora": TINY_TEXT + ["method=fedit", "adapter=bora"],
    "ffa_lora-lora": TINY_TEXT + ["method=ffa_lora", "adapter=lora"],
    "ffa_lora-lora_nonzero": TINY_TEXT + ["method=ffa_lora", "adapter=lora_nonzero"],
    "lora_fair-lora": TINY_TEXT + ["method=lora_fair", "adapter=lora"],
    "lora_fair-bora": TINY_TEXT + ["method=lora_fair", "adapter=bora"],
    "flexlora-lora": TINY_TEXT + ["method=flexlora", "adapter=lora"],
    "flora-lora": TINY_TEXT + ["method=flora", "adapter=lora"],
    "fedex_lora-lora_nonzero": TINY_TEXT + ["method=fedex_lora", "adapter=lora_nonzero"],
    "rolora-lora": TINY_TEXT + ["method=rolora", "adapter=lora"],
    "aad_lora": TINY_TEXT + ["method=aad_lora"],
    "aad_lora_mud-kron_aad": TINY_TEXT + ["method=aad_lora_mud", "adapter=kron_aad"],
    "fedit-kron": TINY_TEXT + ["method=fedit", "adapter=kron"],
    "flora-ranks": TINY_TEXT + ["method=flora", "adapter=lora", "adapter.ranks=[2,4,8]"],
    "flora-ranks-broadcast": TINY_TEXT + ["method=flora", "adapter=lora", "adapter.ranks=[2,4,8]",
                                          "method.downlink=broadcast_update"],
    "fedex_lora-residual2": TINY_TEXT + ["method=fedex_lora", "method.downlink=broadcast_update",
                                         "method.residual_rank=2"],
    "flexlora-ranks": TINY_TEXT + ["method=flexlora", "adapter=lora", "adapter.ranks=[2,4,8]"],
    "zero_pad-ranks": TINY_TEXT + ["method=zero_pad", "adapter=lora", "adapter.ranks=[2,4,8]", "eval.clients=true"],
    "fedsa_lora-lora": TINY_TEXT + ["method=fedsa_lora", "adapter=lora"],
    "fed_sb": TINY_TEXT + ["method=fed_sb"],
}


def built(cfg):
    """The run's method and its initial global model, as the ServerApp and every client build them."""
    from fedlora.methods import make_method

    method = make_method(cfg)
    return method, method.initial_model()


@pytest.fixture(scope="session")
def preset_run(ray_address, tmp_path_factory):
    """preset_run(name) -> (resolved config, run directory) of a simulation of PRESETS[name], run
    once per test session."""
    from fedlora.config import compose, resolve
    from fedlora.simulation import run_simulation

    done = {}

    def run(name: str):
        if name not in done:
            cfg = resolve(compose(PRESETS[name] + [f"simulation.ray_address={ray_address}"]))
            run_dir = tmp_path_factory.mktemp(name)
            run_simulation(cfg, run_dir)
            done[name] = cfg, run_dir
        return done[name]

    return run


def metrics_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
