"""A deployed round against the same round in simulation: SuperNodes on this machine, both ways.

Starts an insecure `flower-superlink` on 127.0.0.1 and, for each way of running a node's ClientApp,
one `flower-supernode` per client (partition i, `num-threads` 1), then `flwr run` of this project
with the run config `overrides=OVERRIDES`:
- `flower`: the SuperNode as Flower 1.41 starts it by default, one `flwr-clientapp` process per
  message;
- `fedlora-superexec`: the SuperNode started with `--isolation process` beside `fedlora-superexec`,
  which runs all of the node's tasks in one process;
- `fedlora-supernode`: that, and the node asking the SuperLink for messages every second (not 3 s);
then `fedlora-sim OVERRIDES` with one Ray actor of one CPU per client. For each it prints the rounds'
seconds and what the records say of them (the wait for the training replies, the slowest client's
own time, the server's evaluation), the test accuracies (the same in all three), and the peak PSS
of the nodes' processes (SuperNodes, executors and ClientApps; the SuperLink and ServerApp apart).

    python benchmarks/deploy_round.py -- num_clients=2 clients_per_round=2 data.train_samples=1200 \\
        local.epochs=3 local.batch_size=64 method=fedmud_bkd_aad num_rounds=3 seed=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from local_flower import BIN, Processes, free_port, wait_for_port, wait_online  # noqa: E402 (the tests' helpers)

GIB = 1024 ** 3


class PeakPss(threading.Thread):
    """The peak summed PSS of some processes and all their descendants, sampled twice a second."""

    def __init__(self, roots: list[subprocess.Popen]):
        super().__init__(daemon=True)
        self.roots, self.peak, self.done = [psutil.Process(p.pid) for p in roots], 0.0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.5):
            total = 0.0
            for root in self.roots:
                try:
                    procs = [root] + root.children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                for proc in procs:
                    try:
                        total += proc.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return round(self.peak / GIB, 2)


def rounds(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] > 0]
    return {
        "round_seconds": [round(r["round_seconds"], 2) for r in rows],
        "training_wait": [round(r["train_seconds"], 2) for r in rows],
        "slowest_client": [round(r["slowest_client_seconds"], 2) for r in rows],
        "evaluation": [round(r["eval_seconds"], 2) for r in rows],
        "test_accuracy": [r["test_accuracy"] for r in rows],
    }


def deployed(procs: Processes, way: str, port: int, clients: int, overrides: list[str], tmp: Path) -> dict:
    nodes = []
    for i in range(clients):
        api = free_port()
        extra = ["--isolation", "process"] if way == "fedlora-superexec" else []
        nodes.append(procs.start(f"{way}-node-{i}", "fedlora-supernode" if way == "fedlora-supernode" else
                                 "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                                 "--node-config", f"partition-id={i} num-threads=1", "--port", str(api), *extra))
        if way == "fedlora-superexec":
            nodes.append(procs.start(f"{way}-exec-{i}", "fedlora-superexec", "--insecure",
                                     "--runtime-api-address", f"127.0.0.1:{api}"))
    wait_online(procs, "bench", lambda online: len(online) >= clients, f"{way}-node-0", timeout=120)
    run_dir = tmp / f"run-{way}"
    memory = PeakPss(nodes)
    started = time.perf_counter()
    out = procs.run("flwr", "run", str(ROOT), "bench", "--stream", "--run-config",
                    f'overrides="{" ".join(overrides)}" run-dir="{run_dir}"', timeout=3600)
    wall = time.perf_counter() - started
    peak = memory.stop()
    procs.stop(nodes)
    # the next way's nodes must be the only ones
    wait_online(procs, "bench", lambda online: not online, f"{way}-node-0", timeout=120)
    if out.returncode != 0 or not (run_dir / "summary.json").exists() \
            or json.loads((run_dir / "summary.json").read_text())["status"] != "completed":
        raise SystemExit(f"{way}: the run failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return {**rounds(run_dir), "flwr_run_seconds": round(wall, 1), "nodes_peak_pss_gib": peak}


def simulated(overrides: list[str], tmp: Path, env: dict) -> dict:
    run_dir = tmp / "run-simulation"
    started = time.perf_counter()
    out = subprocess.run([str(BIN / "fedlora-sim"), *overrides, "simulation.client_resources.num_cpus=1",
                          f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"simulation failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return {**rounds(run_dir), "run_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", default="flower,fedlora-superexec,fedlora-supernode,simulation",
                        help="which of the ways to run, comma-separated (default: all four)")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs (their folder is printed)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = args.overrides or ["num_clients=2", "clients_per_round=2", "data.train_samples=1200",
                                   "local.epochs=3", "local.batch_size=64", "method=fedmud_bkd_aad",
                                   "num_rounds=3", "seed=1"]
    clients = int(next((o.split("=", 1)[1] for o in overrides if o.startswith("num_clients=")), 0))
    if clients < 1 or f"clients_per_round={clients}" not in overrides:
        parser.error("give num_clients=N and clients_per_round=N: one SuperNode per client, all of them a round")
    ways = set(args.ways.split(","))
    if not ways <= {"flower", "fedlora-superexec", "fedlora-supernode", "simulation"}:
        parser.error(f"--ways {args.ways}: choose among flower, fedlora-superexec, fedlora-supernode, simulation")
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-deploy-"))
    port = free_port()
    home = tmp / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    for name in ("FEDLORA_DATA", "FEDLORA_CACHE"):  # the SuperLink's and SuperNodes' apps run in folders of their own
        if env.get(name):
            env[name] = str(Path(env[name]).resolve())
    procs = Processes(env, tmp)
    result = {"overrides": overrides, "machine": f"{platform.processor() or platform.machine()}, "
                                                  f"{os.cpu_count()} cores"}
    try:
        link = procs.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                           "--disable-runtime-dependency-installation")
        wait_for_port(port, link)
        for way in ("flower", "fedlora-superexec", "fedlora-supernode"):
            if way in ways:
                result[way] = deployed(procs, way, port, clients, overrides, tmp)
                print(way, json.dumps(result[way]), flush=True)
        if "simulation" in ways:
            result["simulation"] = simulated(overrides, tmp, env)
    finally:
        procs.stop()
    if args.keep:
        result["logs"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
