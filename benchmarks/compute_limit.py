"""How close fedlora's training, evaluation and whole rounds come to the machine's compute limit.

The limit: the best rate PyTorch reaches on this machine in float32, on one thread (what a Ray client
has) and on all the cores (what a round has): the faster of a large matrix product (2048 x 2048 by
2048 x 2048) and a large 3x3 convolution in channels last (a batch of 64 of 256 x 14 x 14 to 256
channels, forward). Rates are of nominal operations, as PyTorch's FlopCounterMode counts them (a
convolution: 2 x its multiply-adds done directly); a library that computes a 3x3 convolution with
fewer (Winograd) can pass the hardware's own peak in these units, so the limit is measured, not
taken from a datasheet. The work: the operations of the convolutions and matrix products of a training
step (forward and backward) and of an evaluation. Batch norm, ReLU, pooling, the optimiser and the
forming of FedMUD's Kronecker blocks are not counted, so the rates below are lower bounds of the
work done.

For the FedMUD paper's Fashion-MNIST setup (that of round_overhead.py: 100 clients, 10 a round,
Dirichlet 0.3, 3 epochs of batch 64, seed 1), FedAvg and the full FedMUD method (BKD + AAD at 1/32):

1. one client's local training through `train_local`, on one thread as a Ray client trains (the
   first client of 500 to 800 examples, from the initial model, `--repeats` times, the median);
2. the server's evaluation of the test set through `evaluate`, on all the cores, in batches of each
   of `--eval-batches` examples (the median of `--repeats`, after two not counted);
3. `--rounds` rounds of fedlora-sim: each round's counted operations (its clients' examples times
   the epochs times the training operations per example, and the test set's evaluation) over the
   round's seconds, against the limit on all the cores.

    python benchmarks/compute_limit.py --rounds 3
    python benchmarks/compute_limit.py --rounds 0 --eval-batches 1000,128   # the evaluation alone

Prints JSON: the limit on one thread and on all the cores (GFLOP/s, with the two rates it is the
better of), and per method the operations per example, and for the client's training, the server's
evaluation (at each batch size) and each round the GFLOP/s and their fraction of the limit.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from layer_cost import timed  # noqa: E402
from round_overhead import METHODS, PAPER, fedlora_rounds  # noqa: E402

G = 1e9


def best_rates(threads: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s (nominal) of a large float32 matrix product and of a large 3x3 convolution in
    channels last on `threads` threads: the median of `repeats` each, after two not counted."""
    import torch

    torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(64, 256, 14, 14).contiguous(memory_format=torch.channels_last)
    work = {"matmul": (lambda: a @ b, 2 * n ** 3), "conv3x3": (lambda: conv(x), 2 * 64 * 256 * 14 * 14 * 256 * 9)}
    with torch.no_grad():
        return {name: round(flops / timed(run, repeats) / G, 1) for name, (run, flops) in work.items()}


def counted_flops(model, x, y, train: bool) -> float:
    """The operations FlopCounterMode counts in a training step (forward, backward) or an evaluation
    of the batch (x, y), in the layout fedlora uses on a CPU; the model is left as it was."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fedlora.training import images_channels_last, mean_loss

    with images_channels_last(model, x, torch.device("cpu")) as last:
        xb = x.contiguous(memory_format=torch.channels_last) if last else x
        with FlopCounterMode(display=False) as counter:
            if train:
                model.train()
                loss, _ = mean_loss(model, xb, y)
                loss.backward()
            else:
                model.eval()
                with torch.no_grad():
                    model(xb)
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(method_name: str, rounds: int, repeats: int, eval_batches: list[int], limit_one: float,
            limit_all: float) -> dict:
    import torch

    from fedlora.config import compose, resolve
    from fedlora.federated_data import client_tensors, test_tensors
    from fedlora.methods import make_method
    from fedlora.preflight import preflight
    from fedlora.training import evaluate, train_local
    from strategies.strategy import sample

    cfg = resolve(compose(PAPER + METHODS[method_name] + [f"num_rounds={max(rounds, 1)}"]))
    preflight(cfg)
    method = make_method(cfg)
    sizes = {pid: len(client_tensors(cfg, pid)[1]) for pid in range(cfg.num_clients)}
    pid = next(p for p, n in sizes.items() if 500 <= n <= 800)
    x, y = client_tensors(cfg, pid)
    xt, yt = test_tensors(cfg)  # the server's
    model = method.initial_model()
    method.start_round(model, 1)
    method.set_trainable(model, 1)
    batch = cfg.local.batch_size
    per_train = counted_flops(model, x[:batch], y[:batch], train=True) / batch
    per_eval = counted_flops(model, xt[:cfg.eval.batch_size], yt[:cfg.eval.batch_size], train=False) / cfg.eval.batch_size

    torch.set_num_threads(1)
    times = []
    for _ in range(repeats):
        fresh = method.initial_model()
        method.start_round(fresh, 1)
        method.set_trainable(fresh, 1)
        started = time.perf_counter()
        train_local(fresh, x, y, cfg.local, seed=cfg.seed)
        times.append(time.perf_counter() - started)
    train_s = statistics.median(times)
    train_rate = len(y) * cfg.local.epochs * per_train / train_s / G

    torch.set_num_threads(os.cpu_count())
    evaluation = {}
    for size in eval_batches:
        seconds = timed(lambda: evaluate(model, xt, yt, size), repeats)
        rate = len(yt) * per_eval / seconds / G
        evaluation[size] = {"seconds": round(seconds, 3), "gflops": round(rate, 1),
                            "of_all_cores_limit": round(rate / limit_all, 3)}

    rows = fedlora_rounds(cfg)[0] if rounds else []
    per_round = []
    for r, row in enumerate(rows, start=1):
        examples = sum(sizes[p] for p in sample(range(cfg.num_clients), cfg.clients_per_round, cfg.seed, r))
        flops = examples * cfg.local.epochs * per_train + len(yt) * per_eval
        rate = flops / row["round_seconds"] / G
        per_round.append({"round": r, "examples": examples, "seconds": row["round_seconds"],
                          "gflop": round(flops / G, 1), "gflops": round(rate, 1),
                          "of_limit": round(rate / limit_all, 3)})
    return {
        "gflop_per_example": {"training": round(per_train / G, 4), "evaluation": round(per_eval / G, 4)},
        "client_training": {"client": pid, "examples": len(y), "epochs": cfg.local.epochs, "seconds": round(train_s, 3),
                            "gflops": round(train_rate, 1), "of_one_thread_limit": round(train_rate / limit_one, 3)},
        "server_evaluation": {"examples": len(yt), "by_batch": evaluation},
        "eval_batch_size": cfg.eval.batch_size,  # the rounds'
        "rounds": per_round,
        "rounds_of_limit_mean": round(statistics.mean(r["of_limit"] for r in per_round), 3) if per_round else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-batches", default="1000,128", help="comma-separated batch sizes of the evaluation")
    parser.add_argument("--only", choices=sorted(METHODS), action="append")
    args = parser.parse_args()
    eval_batches = [int(b) for b in args.eval_batches.split(",")]
    import torch

    from fedlora.records import setup_logging

    setup_logging(stream=sys.stderr)  # the runs' round lines: stdout is for the JSON

    one, every = best_rates(1), best_rates(os.cpu_count())
    limit_one, limit_all = max(one.values()), max(every.values())
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
           "limit_gflops": {"one_thread": limit_one, "all_cores": limit_all},
           "best_rates_gflops": {"one_thread": one, "all_cores": every}, "methods": {}}
    for name in args.only or METHODS:
        out["methods"][name] = measure(name, args.rounds, args.repeats, eval_batches, limit_one, limit_all)
        print(json.dumps({name: out["methods"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
