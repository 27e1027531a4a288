"""A fedlora round against the plain in-process loop that does the same local steps on the same
clients: what Flower, Ray, the messages and the records cost on top of the training itself.

The loop uses fedlora's own pieces for the experiment (data, partitions, the method's model, its
`load`, `train_local` with the same seeds, its `aggregate`, the server's evaluation) with no Flower, no
Ray, no messages and no records, one client after another on all the cores that the simulation's Ray
gets (torch threads = those cores). Both run the FedMUD paper's Fashion-MNIST setup (100 clients, 10
a round, Dirichlet 0.3, 3 epochs of batch 64) for FedAvg and the full FedMUD method (BKD + AAD at
1/32), `--rounds` rounds each. The accuracies agree up to floating-point rounding: the loop's two
threads sum a convolution's gradients in another order than two one-thread clients do.

    python benchmarks/round_overhead.py --rounds 3

Prints JSON: per method, each round's seconds in both, `ratio` (fedlora's mean round time over the
loop's; target at most 1.25), the split of each round in both (fedlora's from its records: the
clients' own time, the wait for them beyond the least that its Ray actors could take, aggregation,
evaluation, the rest) and the fedlora driver process's CPU seconds per round (the ServerApp and Ray's
driver, Ray's start and the initial evaluation included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER = ["num_clients=100", "clients_per_round=10", "partition=dirichlet", "partition.alpha=0.3", "local.epochs=3",
         "local.batch_size=64", "seed=1"]
METHODS = {"fedavg": ["method=fedavg"], "fedmud_bkd_aad": ["method=fedmud_bkd_aad"]}


def driver_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fedlora_rounds(cfg) -> tuple[list[dict], float]:
    """(each round's records, the driver's CPU seconds over the run)."""
    from fedlora.simulation import run_simulation

    with tempfile.TemporaryDirectory() as run_dir:
        cpu = driver_cpu()
        run_simulation(cfg, run_dir)
        cpu = driver_cpu() - cpu
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, cpu


def breakdown(row: dict, actors: int) -> dict:
    """Where a fedlora round's time went: the clients' own time on their messages, the least time
    `actors` clients in parallel could take for them (the slowest client, or an even share of all),
    the wait beyond that (messages, Ray, and how the clients fell to the actors), aggregation, the
    server's evaluation, and the rest (a broadcast, the clients' evaluation, the records). A round
    that aggregated nothing has no clients' times: those figures are then null."""
    rest = row["round_seconds"] - row["train_seconds"] - row["aggregate_seconds"] - row["eval_seconds"]
    out = {"clients_sum": None, "slowest_client": None, "least_training_wait": None,
           "training_wait": row["train_seconds"], "beyond_least": None, "aggregation": row["aggregate_seconds"],
           "evaluation": row["eval_seconds"], "rest": round(rest, 3)}
    if row.get("slowest_client_seconds") is not None:
        least = max(row["slowest_client_seconds"], row["all_clients_seconds"] / actors)
        out |= {"clients_sum": row["all_clients_seconds"], "slowest_client": row["slowest_client_seconds"],
                "least_training_wait": round(least, 3), "beyond_least": round(row["train_seconds"] - least, 3)}
    return out


def loop_rounds(cfg, threads: int) -> tuple[list[dict], list[float]]:
    """The same rounds in one process: each round's seconds (training, aggregation, evaluation), and
    the accuracy after each."""
    import torch

    from fedlora.aggregate import Update
    from fedlora.federated_data import client_tensors, test_tensors
    from fedlora.methods import make_method
    from fedlora.seeds import derive_seed
    from fedlora.state import state_tensors
    from fedlora.training import evaluate, train_local
    from strategies.strategy import sample

    torch.set_num_threads(threads)
    method = make_method(cfg)
    server, client = method.initial_model(), method.initial_model()
    x_test, y_test = test_tensors(cfg)
    cpu = torch.device("cpu")
    times, accuracies = [], []
    for rnd in range(1, cfg.num_rounds + 1):
        started = time.perf_counter()
        method.start_round(server, rnd)
        down = state_tensors(server, method.down_keys(server, rnd))
        updates = []
        for pid in sample(range(cfg.num_clients), cfg.clients_per_round, cfg.seed, rnd):
            x, y = client_tensors(cfg, pid)
            method.load(client, down, rnd, required=method.down_keys(client, rnd))
            method.set_trainable(client, rnd)
            train_local(client, x, y, cfg.local, seed=derive_seed(cfg.seed, "train", rnd, pid), device=cpu)
            up = state_tensors(client, method.up_keys(client, rnd))
            updates.append(Update({k: v.numpy() for k, v in up.items()}, len(y)))
        trained = time.perf_counter()
        method.aggregate(server, updates)
        aggregated = time.perf_counter()
        acc, _ = evaluate(server, x_test, y_test, cfg.eval.batch_size, cpu)
        done = time.perf_counter()
        times.append({"seconds": round(done - started, 3), "training": round(trained - started, 3),
                      "aggregation": round(aggregated - trained, 3), "evaluation": round(done - aggregated, 3)})
        accuracies.append(acc)
        print(f"loop round {rnd}: {times[-1]}, accuracy {acc:.4f}", file=sys.stderr, flush=True)
    return times, accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("overrides", nargs="*", help="fedlora-sim overrides for both")
    args = parser.parse_args()
    for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}.items():
        os.environ.setdefault(key, value)
    from fedlora.config import compose, resolve
    from fedlora.preflight import preflight
    from fedlora.records import setup_logging

    setup_logging(stream=sys.stderr)
    out = {"setup": PAPER + [f"num_rounds={args.rounds}"] + args.overrides,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "methods": {}}
    for name in args.methods.split(","):
        cfg = resolve(compose(PAPER + METHODS[name] + [f"num_rounds={args.rounds}"] + args.overrides))
        preflight(cfg)  # the data decoded and partitioned once, for both
        cores = cfg.simulation.ray_num_cpus or os.cpu_count()
        loop, loop_acc = loop_rounds(cfg, cores)
        rows, cpu = fedlora_rounds(cfg)
        seconds, acc = [r["round_seconds"] for r in rows], [r["test_accuracy"] for r in rows]
        actors = int(cores // cfg.simulation.client_resources.num_cpus)
        mean_fedlora = sum(seconds) / len(seconds)
        mean_loop = sum(r["seconds"] for r in loop) / len(loop)
        out["methods"][name] = {
            "fedlora_round_seconds": seconds, "fedlora_rounds": [breakdown(r, actors) for r in rows],
            "loop_rounds": loop, "ratio": round(mean_fedlora / mean_loop, 3),
            "fedlora_driver_cpu_seconds_per_round": round(cpu / len(seconds), 2), "loop_threads": cores,
            "fedlora_accuracy": acc, "loop_accuracy": loop_acc,
            "max_accuracy_difference": round(max(abs(a - b) for a, b in zip(acc, loop_acc)), 4)}
        print(json.dumps({name: out["methods"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
