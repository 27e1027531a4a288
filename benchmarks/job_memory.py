"""The memory and round times of a whole fedlora-sim job: the driver, Ray's own processes and the
client actors, as one figure.

Runs `fedlora-sim OVERRIDES` in a process group of its own and samples, every `--every` seconds, the
proportional set size (PSS: each shared page divided among the processes that share it, so that the
sum is what the job holds) of every process the run started: the driver and all its descendants
(Ray's GCS and raylet, and the workers the raylet starts; a worker Ray starts ahead, idle, counts
among the client actors). A Ray cluster it did not start (simulation.ray_address) is not counted.

    python benchmarks/job_memory.py -- num_clients=100 clients_per_round=10 partition=dirichlet \\
        partition.alpha=0.3 local.epochs=3 local.batch_size=64 seed=1 num_rounds=3
    python benchmarks/job_memory.py --label 10000-clients -- num_clients=10000 partition=iid num_rounds=3

Prints JSON: the peak PSS of the job (GiB) and, at that moment, by kind of process (driver, Ray's
processes, client actors), the peak number of processes, the wall time, and each round's seconds
from the run's records (with the wait for the training replies, and the server's evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("fedlora-sim")
GIB = 1024 ** 3


def kind(proc: psutil.Process, driver: int) -> str:
    if proc.pid == driver:
        return "driver"
    try:
        name = " ".join(proc.cmdline()[:3])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    # a worker (idle, or a client actor) runs default_worker.py, its title "ray::IDLE" or "ray::ClientAppActor...";
    # Ray's agents are titled "ray::DashboardAgent" and "ray::RuntimeEnvAgent"
    agent = name.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))
    return "client actors" if not agent and ("default_worker.py" in name or name.startswith("ray::")) else "ray"


def sample(driver: psutil.Process) -> dict[str, float]:
    """PSS by kind of process, in bytes, of the driver and all its descendants."""
    out: dict[str, float] = {}
    try:
        procs = [driver] + driver.children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            pss = proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        k = kind(proc, driver.pid)
        out[k] = out.get(k, 0.0) + pss
        out["processes"] = out.get("processes", 0) + 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--label", default="")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir, tempfile.TemporaryFile("w+") as log:
        env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        started = time.time()
        # its output to a file: a pipe that nobody reads while it runs would fill, and stop the run
        proc = subprocess.Popen([str(CLI), *args.overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        driver = psutil.Process(proc.pid)
        peak: dict[str, float] = {}
        processes = 0
        try:
            while proc.poll() is None:
                now = sample(driver)
                total = sum(v for k, v in now.items() if k != "processes")
                if total > sum(v for k, v in peak.items()):
                    peak = {k: v for k, v in now.items() if k != "processes"}
                processes = max(processes, int(now.get("processes", 0)))
                time.sleep(args.every)
        finally:
            if proc.poll() is None:  # interrupted, or this script failed: the run and its Ray go too
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait()
        wall = time.time() - started
        if proc.returncode != 0:
            log.seek(0)
            sys.exit(f"fedlora-sim failed ({proc.returncode}): {log.read()[-3000:]}")
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({
        "label": args.label, "overrides": args.overrides,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "peak_pss_gib": round(sum(peak.values()) / GIB, 3),
        "at_peak_gib": {k: round(v / GIB, 3) for k, v in sorted(peak.items())},
        "max_processes": processes, "wall_seconds": round(wall, 1),
        "round_seconds": [r["round_seconds"] for r in rows],
        "train_seconds": [r["train_seconds"] for r in rows],  # of which: sending, training, replies
        "eval_seconds": [r["eval_seconds"] for r in rows],  # the server's evaluation
        "test_accuracy": [r["test_accuracy"] for r in rows],
    }, indent=1))


if __name__ == "__main__":
    main()
