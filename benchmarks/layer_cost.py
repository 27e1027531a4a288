"""Forward + backward time of each parametrized layer against the dense layer of the same shape.

Each method's model is built as a run builds it (the paper's CNN for Fashion-MNIST, VGG for CIFAR-10,
MiniLM with an adapter on AG News), and one batch of the run's real inputs goes through it to find
what each layer sees. Then, one layer at a time, on one thread (a Ray client's share): the
parametrized layer's forward and backward (what it trains, and the gradient it passes back), against
a dense Conv2d or Linear of the same shape whose weight trains (FedAvg's layer), and, for an
adapter, against the frozen pretrained layer alone (what the adapter adds). The median of `--repeats`
timings after two warm-up passes.

    python benchmarks/layer_cost.py                      # every preset below
    python benchmarks/layer_cost.py --only fmnist-fedmud_bkd_aad

Prints JSON: per preset, per layer, its shape, the parametrization, the milliseconds of each and the
ratio to the dense layer (target at most 1.3), the largest ratio, and that of all layers together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE = ["local.batch_size=64"]
TEXT = ["dataset=agnews", "model.max_length=64", "local.batch_size=32", "data.train_samples=400", "data.test_samples=100",
        "num_clients=4", "clients_per_round=2"]
PRESETS = {
    **{f"fmnist-{m}": IMAGE + [f"method={m}"] for m in ("fedlmt", "fedpara", "fedmud", "fedmud_bkd", "fedmud_aad",
                                                         "fedmud_bkd_aad")},
    **{f"cifar10-{m}": IMAGE + ["dataset=cifar10", f"method={m}"] for m in ("fedmud", "fedmud_bkd_aad")},
    **{f"minilm-{a}": TEXT + ["method=fedit", f"adapter={a}"] for a in ("lora", "bora", "kron")},
    "minilm-aad_lora": TEXT + ["method=aad_lora"],
    "minilm-kron_aad": TEXT + ["method=aad_lora_mud", "adapter=kron_aad"],
    "minilm-lora_sb": TEXT + ["method=fed_sb"],
}


def timed(step, repeats: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def forward_backward(layer, x):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()
    return step


def layer_inputs(cfg, model):
    """What each parametrized layer of `model` receives on one batch of the run's training data."""
    import torch

    from fedlora.federated_data import client_tensors
    from fedlora.parametrizations.base import delta_layers

    x, _ = client_tensors(cfg, 0)
    x = x[: cfg.local.batch_size]
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0].detach()))
             for name, layer in delta_layers(model)]
    with torch.no_grad():
        model.eval()
        model(x)
    for h in hooks:
        h.remove()
    return seen


def dense_like(layer, trainable: bool):
    """A dense Conv2d or Linear of the parametrized layer's shape (its weight trained, or frozen)."""
    import torch
    from torch import nn

    shape = layer.weight_shape
    if layer._conv is None:
        dense = nn.Linear(shape[1], shape[0], bias=layer.bias is not None)
    else:
        dense = nn.Conv2d(shape[1] * layer._conv["groups"], shape[0], shape[2:], bias=layer.bias is not None,
                          **layer._conv)
    if not trainable:  # the pretrained layer alone
        with torch.no_grad():
            dense.weight.copy_(layer.weight)
        dense.requires_grad_(False)
    return dense


def measure(name: str, overrides: list[str], repeats: int) -> dict:
    import torch

    from fedlora.config import compose, resolve
    from fedlora.methods import make_method
    from fedlora.parametrizations.base import delta_layers
    from fedlora.preflight import preflight

    cfg = resolve(compose(overrides))
    preflight(cfg)
    method = make_method(cfg)
    model = method.initial_model()
    method.set_trainable(model, 1)
    inputs = layer_inputs(cfg, model)
    model.train()  # timed as it trains (dropout, where a config sets it)
    rows = []
    for layer_name, layer in delta_layers(model):
        x = inputs[layer_name].clone().requires_grad_(True)
        row = {"layer": layer_name, "weight": list(layer.weight_shape), "input": list(x.shape),
               "delta": type(layer.delta).__name__, "additive": layer.additive}
        row["seconds"] = timed(forward_backward(layer, x), repeats)
        row["dense_seconds"] = timed(forward_backward(dense_like(layer, trainable=True), x), repeats)
        row["ratio"] = round(row["seconds"] / row["dense_seconds"], 3)
        if layer.additive:  # an adapter: what it adds to its frozen pretrained layer
            row["frozen_seconds"] = timed(forward_backward(dense_like(layer, trainable=False), x), repeats)
            row["ratio_to_frozen"] = round(row["seconds"] / row["frozen_seconds"], 3)
        for key in ("seconds", "dense_seconds", "frozen_seconds"):
            if key in row:
                row[key] = round(row[key] * 1000, 3)  # as milliseconds
        rows.append(row)
        print(f"{name} {layer_name}: {row['delta']} {row['seconds']} ms, dense {row['dense_seconds']} ms, "
              f"ratio {row['ratio']}", file=sys.stderr, flush=True)
    total = sum(r["seconds"] for r in rows) / sum(r["dense_seconds"] for r in rows)
    return {"overrides": overrides, "layers": rows, "max_ratio": max(r["ratio"] for r in rows),
            "all_layers_ratio": round(total, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PRESETS), help="comma-separated preset names")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray client's default share: 1)")
    args = parser.parse_args()
    import torch

    from fedlora.records import setup_logging

    setup_logging(stream=sys.stderr)
    torch.set_num_threads(args.threads)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "threads": args.threads, "unit": "milliseconds per forward + backward", "presets": {}}
    for name in args.only.split(","):
        out["presets"][name] = measure(name, PRESETS[name], args.repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
