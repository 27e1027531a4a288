"""A plain in-process PyTorch FedAvg loop: the reference that fedlora's Flower/Ray FedAvg must match.

No Flower, no Ray, no message records: a copy of the global model per sampled client, SGD over the
client's rows, a weighted average of the state dicts. It shares with fedlora only what defines the
experiment (data, partitions, initial model, the seeds of sampling and of the batch order, the
server's evaluation), so a difference in the result points at fedlora's federated machinery. Like
fedlora on a CPU, it trains a model of images in the channels-last layout (the same arithmetic in
the same order, so that the two agree exactly on CPU).

    python benchmarks/reference_fedavg.py                 # 10 rounds, 20 clients, 5 a round, Dir(0.3)
    python benchmarks/reference_fedavg.py num_rounds=3    # any fedlora-sim override

It runs both fedlora-sim's simulation and this loop on the same config and prints both accuracy
curves and their largest difference.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fedlora.config import compose, resolve
from fedlora.seeds import derive_seed
from fedlora.federated_data import client_tensors, test_tensors
from fedlora.models import dense_model
from fedlora.training import evaluate

BENCH_OVERRIDES = ["num_rounds=10", "num_clients=20", "clients_per_round=5", "partition=dirichlet",
                   "partition.alpha=0.3"]


def reference_fedavg(cfg) -> list[float]:
    """Test accuracy after each round."""
    torch.set_num_threads(max(1, int(cfg.simulation.client_resources.num_cpus)))
    global_model = dense_model(cfg)
    x_test, y_test = test_tensors(cfg)
    keys = [k for k, v in global_model.state_dict().items() if v.is_floating_point()]
    accuracies = []
    for rnd in range(1, cfg.num_rounds + 1):
        rng = random.Random(derive_seed(cfg.seed, "sample", rnd))
        sampled = sorted(rng.sample(range(cfg.num_clients), cfg.clients_per_round))
        states, sizes = [], []
        for pid in sampled:
            x, y = client_tensors(cfg, pid)
            model = copy.deepcopy(global_model).train()
            last = x.dim() == 4  # images: channels last, as fedlora.training trains them on a CPU
            if last:
                model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.local.lr, momentum=cfg.local.momentum,
                                  weight_decay=cfg.local.weight_decay)
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, "train", rnd, pid))
            for _ in range(cfg.local.epochs):
                for idx in torch.randperm(len(y), generator=g).split(cfg.local.batch_size):
                    opt.zero_grad()
                    xb = x[idx].contiguous(memory_format=torch.channels_last) if last else x[idx]
                    nn.functional.cross_entropy(model(xb), y[idx]).backward()
                    opt.step()
            states.append(model.state_dict())
            sizes.append(len(y))
        total = sum(sizes)
        new_state = global_model.state_dict()
        for k in keys:
            avg = sum(s[k].double() * (n / total) for s, n in zip(states, sizes))
            new_state[k] = avg.to(new_state[k].dtype)
        global_model.load_state_dict(new_state)
        acc, _ = evaluate(global_model, x_test, y_test, cfg.eval.batch_size, torch.device("cpu"))
        accuracies.append(acc)
        print(f"reference round {rnd}: accuracy {acc:.4f}", flush=True)
    return accuracies


def main(argv: list[str]) -> None:
    from fedlora.records import setup_logging
    from fedlora.simulation import run_simulation

    cfg = resolve(compose(BENCH_OVERRIDES + argv))
    setup_logging(cfg.verbose, stream=sys.stderr)
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.time()
        run_simulation(cfg, run_dir)
        sim_seconds = time.time() - t0
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        framework = [json.loads(line)["test_accuracy"] for line in lines]
    t0 = time.time()
    reference = reference_fedavg(cfg)
    ref_seconds = time.time() - t0
    diff = max(abs(a - b) for a, b in zip(framework, reference))
    print(json.dumps({"overrides": BENCH_OVERRIDES + argv, "framework": framework, "reference": reference,
                      "max_abs_difference": diff, "framework_seconds": round(sim_seconds, 1),
                      "reference_seconds": round(ref_seconds, 1)}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
