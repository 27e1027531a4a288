"""The server's cost of combining a round's replies: each method's aggregation for 10, 100 and 1000
replies, LoRA-FAIR's refinement, FlexLoRA's and FedEx-LoRA's SVDs included.

Each method's global model is built as a run builds it (the paper's CNN for Fashion-MNIST for the
FedMUD family and FedAvg, the 6-layer MiniLM with r = 8 adapters for the federated LoRA methods), and
a reply is what a client sends in round 1 (the method's `up_keys`), its values perturbed as training
perturbs them and weighted by a varying number of examples. Ten distinct replies are drawn and
repeated to make 100 and 1000 (the arithmetic is the same; memory would not be): the time is that of
`method.aggregate` on the server's model, the median of `--repeats` runs, on one thread unless
`--threads` says otherwise. Every client has the global model's rank (heterogeneous ranks are not
measured here).

    python benchmarks/server_cost.py
    python benchmarks/server_cost.py --only flexlora,lora_fair --replies 10,100

Prints JSON: per method, the seconds for each number of replies, and the numbers a reply carries.
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

TEXT = ["dataset=agnews", "data.train_samples=400", "data.test_samples=100", "num_clients=4",
        "clients_per_round=2"]
METHODS = {
    **{m: [f"method={m}"] for m in ("fedavg", "fedlmt", "fedpara", "fedmud", "fedmud_bkd_aad")},
    **{m: TEXT + [f"method={m}"] for m in ("fedit", "ffa_lora", "lora_fair", "flexlora", "flora", "fedex_lora",
                                           "rolora", "fedsa_lora", "aad_lora", "zero_pad")},
}


def replies(method, model, count: int, seed: int):
    """`count` round-1 replies: ten distinct ones, repeated."""
    import numpy as np

    from fedlora.aggregate import Update
    from fedlora.state import state_tensors

    method.start_round(model, 1)
    sent = {k: v.numpy() for k, v in state_tensors(model, method.up_keys(model, 1)).items()}
    rng = np.random.default_rng(seed)
    distinct = []
    for i in range(10):
        arrays = {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v.copy()
                  for k, v in sent.items()}
        distinct.append(Update(arrays, int(rng.integers(10, 1500))))
    numbers = sum(v.size for v in sent.values())
    return [distinct[i % 10] for i in range(count)], numbers


def measure(name: str, overrides: list[str], counts: list[int], repeats: int) -> dict:
    from fedlora.config import compose, resolve
    from fedlora.methods import make_method
    from fedlora.state import state_tensors

    cfg = resolve(compose(overrides))
    method = make_method(cfg)
    model = method.initial_model()
    start = state_tensors(model, method.global_keys(model))
    out = {"overrides": overrides, "seconds": {}}
    for count in counts:
        method.load(model, start, 1, required=start)  # round 1's replies, whatever was aggregated before
        updates, out["numbers_per_reply"] = replies(method, model, count, seed=count)
        times = []
        for _ in range(repeats):
            method.load(model, start, 1, required=start)  # each run from the same global state
            method.start_round(model, 1)
            started = time.perf_counter()
            method.aggregate(model, updates)
            times.append(time.perf_counter() - started)
        out["seconds"][str(count)] = round(statistics.median(times), 4)
        print(f"{name}: {count} replies, {out['seconds'][str(count)]} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(METHODS))
    parser.add_argument("--replies", default="10,100,1000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    from fedlora.records import setup_logging

    setup_logging(stream=sys.stderr)
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.replies.split(",")]
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "threads": args.threads,
           "methods": {}}
    for name in args.only.split(","):
        out["methods"][name] = measure(name, METHODS[name], counts, args.repeats)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
