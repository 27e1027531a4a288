"""Seconds per round, GPU memory and GPU utilisation of a fedlora-sim run whose clients share a GPU.

Runs `fedlora-sim OVERRIDES` (the paper's CIFAR-10 setup, say) in a process group of its own for at
most `--seconds`, then stops it as Ctrl-C does: the server closes its records after the round under
way, so a run cut short still has every finished round. While it runs, `nvidia-smi` samples the
GPU's utilisation and memory every `--every` seconds. The utilisation counts from the end of round 1:
Ray's start, the data's decoding, the clients' CUDA set-up and their first batches are before it.

    python benchmarks/gpu_rounds.py --seconds 120 -- experiment=cifar10_paper method=fedavg
    python benchmarks/gpu_rounds.py --seconds 120 -- experiment=cifar10_paper method=fedmud_bkd_aad

Prints JSON: the machine (GPU, driver, CPU cores, PyTorch), the rounds finished, each round's
seconds (with the wait for the training replies, the slowest client and the server's evaluation),
the median round without the first (the clients' first batches are slower), accuracy per round,
the GPU memory used (peak, and above what was used before the run) and utilisation (mean, median,
and the fraction of samples above 0) over the rounds. Without `nvidia-smi` the GPU figures are null.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("fedlora-sim")
# where fedlora is on the path but not installed (no fedlora-sim script): the same entry point
COMMAND = [str(CLI)] if CLI.exists() else [sys.executable, "-c", "from fedlora.cli import main; main()"]
QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits"]
APPS = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]


def machine() -> dict:
    import torch

    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "torch": torch.__version__, "gpu": None, "driver": None}
    if shutil.which("nvidia-smi"):
        name = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip().split(", ")
        if len(name) == 2:
            out["gpu"], out["driver"] = name
    return out


class Sampler(threading.Thread):
    """(time, utilisation %, memory used MiB) of GPU 0 every `every` seconds, from nvidia-smi; and
    every 2 s the processes on it with their memory (MiB)."""

    def __init__(self, every: float):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.processes, self.process_mib = 0, 0.0

    def read_apps(self) -> None:
        try:
            lines = subprocess.run(APPS, capture_output=True, text=True, timeout=10).stdout.splitlines()
            mib = [float(line.split(", ")[1]) for line in lines if line.strip()]
        except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
            return
        self.processes, self.process_mib = max(self.processes, len(mib)), max([self.process_mib, *mib])

    def read(self) -> tuple[float, float, float] | None:
        try:
            line = subprocess.run(QUERY, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
            util, used, _ = (float(v) for v in line.split(", "))
        except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
            return None
        return time.time(), util, used

    def run(self) -> None:
        last_apps = 0.0
        while not self.stop.is_set():
            s = self.read()
            if s is not None:
                self.samples.append(s)
            if time.time() - last_apps >= 2:
                self.read_apps()
                last_apps = time.time()
            self.stop.wait(self.every)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300, help="stop the run after this long")
    parser.add_argument("--every", type=float, default=0.25, help="seconds between GPU samples")
    parser.add_argument("--label", default="")
    parser.add_argument("--keep", help="a directory for the run's records (default: a temporary one)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    gpu = shutil.which("nvidia-smi") is not None
    sampler = Sampler(args.every)
    before = sampler.read() if gpu else None
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile("w+") as log:
        run_dir = Path(args.keep or tmp).resolve()
        metrics = run_dir / "metrics.jsonl"
        env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        started = time.time()
        if gpu:
            sampler.start()
        # its output to a file: a pipe that nobody reads while it runs would fill, and stop the run
        proc = subprocess.Popen([*COMMAND, *args.overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        round_one = None  # when round 1 ended: its records are the first
        stopped = False
        try:
            while proc.poll() is None:
                if round_one is None and metrics.exists():
                    round_one = time.time()
                if not stopped and time.time() - started > args.seconds:
                    os.killpg(proc.pid, signal.SIGINT)  # the server stops after the round under way
                    stopped = True
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            sampler.stop.set()
        wall = time.time() - started
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        log.seek(0)
        tail = log.read()[-3000:]
    if not rows:
        sys.exit(f"fedlora-sim finished no round ({proc.returncode}): {tail}")
    rounds = [r["round_seconds"] for r in rows]
    during = [s for s in sampler.samples if round_one is not None and s[0] >= round_one]
    utils = [s[1] for s in during]
    print(json.dumps({
        "label": args.label, "overrides": args.overrides, "machine": machine(),
        "stopped_after_seconds": args.seconds if stopped else None, "wall_seconds": round(wall, 1),
        "rounds": len(rows),
        "median_round_seconds_after_first": round(statistics.median(rounds[1:]), 3) if len(rounds) > 1 else None,
        "round_seconds": rounds,
        "train_seconds": [r["train_seconds"] for r in rows],  # sending, training, replies
        "slowest_client_seconds": [r["slowest_client_seconds"] for r in rows],
        "eval_seconds": [r["eval_seconds"] for r in rows],  # the server's evaluation
        "test_accuracy": [r["test_accuracy"] for r in rows],
        "gpu_memory_peak_mib": max((s[2] for s in sampler.samples), default=None),
        "gpu_memory_before_mib": before[2] if before else None,
        "gpu_processes_max": sampler.processes if gpu else None,  # the server and the client actors on it
        "gpu_memory_per_process_max_mib": sampler.process_mib if gpu else None,
        "gpu_utilisation_mean": round(statistics.mean(utils), 1) if utils else None,
        "gpu_utilisation_median": statistics.median(utils) if utils else None,
        "gpu_busy_fraction": round(sum(u > 0 for u in utils) / len(utils), 3) if utils else None,
        "gpu_samples": len(during),
    }, indent=1))
    if proc.returncode not in (0, None) and not stopped:
        sys.exit(f"fedlora-sim failed ({proc.returncode}): {tail}")


if __name__ == "__main__":
    main()
