"""Short runs one after the other in one process, as a Hydra sweep's jobs run (`fedlora-sim -m`) and
as the test suite runs its simulations: with the Ray connection and idle client actors kept from one
run to the next (fedlora.simulation, the default), against Flower 1.41's backend, which ends both
after every run.

Each way runs in a fresh process of its own (local Ray, as `fedlora-sim` starts it), the ways
alternating `--pairs` times; each prints the seconds of each of its runs and their final
accuracies (the same both ways: an actor holds no run's state).

    python benchmarks/sweep_runs.py --runs 4 -- num_clients=4 clients_per_round=2 num_rounds=2 \\
        data.train_samples=1200 data.test_samples=500 local.batch_size=32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SMALL  # noqa: E402 (the tests' small Fashion-MNIST setup)


def one_way(flower: bool, runs: int, overrides: list[str]) -> dict:
    """In this process: `runs` simulations of `overrides` (seeds 1..runs), each timed."""
    from fedlora import simulation
    from fedlora.config import compose, resolve

    if flower:
        simulation._use_kept_actors = lambda: None  # Flower's RayBackend stays in place
    seconds, accuracies = [], []
    for seed in range(1, runs + 1):
        start = time.perf_counter()
        cfg = resolve(compose(overrides + [f"seed={seed}"]))
        with tempfile.TemporaryDirectory() as run_dir:
            simulation.run_simulation(cfg, run_dir)
            accuracies.append(json.loads((Path(run_dir) / "summary.json").read_text())["final_accuracy"])
        seconds.append(round(time.perf_counter() - start, 2))
    return {"way": "flower" if flower else "kept", "seconds": seconds, "final_accuracy": accuracies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4, help="runs one after the other in each process")
    parser.add_argument("--pairs", type=int, default=1, help="times each way runs, alternating")
    parser.add_argument("--way", choices=["flower", "kept"], help=argparse.SUPPRESS)  # one process's way
    parser.add_argument("overrides", nargs="*", help="the runs' overrides (after --)")
    args = parser.parse_args()
    overrides = args.overrides or SMALL
    if args.way:
        print(json.dumps(one_way(args.way == "flower", args.runs, overrides)))
        return
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_DISABLE_USAGE_STATS": "1"}
    results = []
    for _ in range(args.pairs):
        for way in ("flower", "kept"):
            out = subprocess.run([sys.executable, __file__, "--way", way, "--runs", str(args.runs), "--", *overrides],
                                 capture_output=True, text=True, env=env, cwd=ROOT)
            if out.returncode != 0:
                sys.exit(f"the {way} process failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))  # its one line of JSON
    later = {way: [s for r in results if r["way"] == way for s in r["seconds"][1:]] for way in ("flower", "kept")}
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "overrides": overrides, "runs": args.runs, "results": results,
        "mean_seconds_after_the_first": {w: round(sum(v) / len(v), 2) for w, v in later.items() if v},
    }, indent=2))


if __name__ == "__main__":
    main()
