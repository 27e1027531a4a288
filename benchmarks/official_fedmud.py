"""fedlora against the official FedMUD code on the paper's Fashion-MNIST setup, side by side.

The official code (github.com/Leopold1423/fedmud-icml25, ICML 2025) runs as its `run/11-fedavg.sh` and
`run/12-feddmu.sh` run it: one `train/server.py` process and ten `train/client.py` processes on Flower's
gRPC server, each client process training one sampled client a round. Its settings are those scripts'
(100 clients, 10 a round, `labeldir0.3`, 3 epochs of batch 64, momentum 0; FedAvg at lr 0.03; FedMUD as
`kron` + `fab+cfd` at ratio 1/32, `uni_5.0`, interval 1, lr 0.01), for `--rounds` rounds. fedlora runs
the same setup (`benchmarks/round_overhead.py`'s PAPER, with `method=fedavg` and `method=fedmud_bkd_aad`)
with `fedlora-sim`'s defaults. The two partition the data each their own way, so the figure compared is
milliseconds per training example per round: the rounds' seconds over the examples of the clients that
trained in them (each trains `local.epochs` passes over its examples).

Nothing of the official code is kept here: give a checkout of it, and the Python of an environment
with its requirements (`pip install -r requirements.txt`; by default this Python):

    git clone https://github.com/Leopold1423/fedmud-icml25 /tmp/fedmud-icml25
    python benchmarks/official_fedmud.py --official /tmp/fedmud-icml25 --rounds 5

The official code reads its data and partitions under a `workspace` path that its sources leave as
`"your_path/feddmu"`; this script sets that variable in the processes it starts (the files are not
changed), puts the Fashion-MNIST files of `$FEDLORA_DATA/fashion-mnist` where torchvision looks, and
partitions them with the official `datapartition.py` (seed 1234). Times of the official rounds are
taken as the server's log lines arrive (round n ends when the server logs its test accuracy); the
examples of a round from the clients' logs, which name the client each process trained.

Prints JSON: per method and code, each round's seconds, examples and test accuracy, the milliseconds
per example per round over all rounds and over rounds 2 on, the job's wall time, and the ratio
official / fedlora of the milliseconds per example (target 2).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from round_overhead import METHODS, PAPER, fedlora_rounds  # noqa: E402

COMMON = ["--model", "cnn", "--dataset", "fmnist", "--num_client", "100"]
SERVER = ["--momentum", "0", "--l2", "0", "--epochs", "3", "--batch_size", "64", "--save_round", "0",
          "--num_per_round", "10", "--gpu", "0"]
CLIENT = ["--part_strategy", "labeldir0.3", "--val_ratio", "0.0", "--gpu", "0"]
FEDMUD = ["--dmu_type", "kron", "--dmu_pattern", "fab+cfd", "--ratio", "0.03125", "--init_type_mag", "uni_5.0",
          "--skip_front_back", "1-1"]
OFFICIAL = {  # (server's arguments, clients' arguments) of each method, as the run/ scripts give them
    "fedavg": (["--com_type", "fedavg", "--lr", "0.03"], ["--com_type", "fedavg"]),
    "fedmud_bkd_aad": (["--com_type", "feddmu", "--lr", "0.01", "--dmu_interval", "1"] + FEDMUD,
                       ["--com_type", "feddmu"] + FEDMUD),
}
CLIENTS_PER_ROUND = 10
PARTITION_SEED = 1234  # the official partition files' seed
# Runs an official script with the official sources importable and their `workspace` set.
PRELUDE = """import runpy, sys
official, workspace, script = sys.argv[1:4]
sys.argv = [script] + sys.argv[4:]
sys.path.insert(0, official)
import dataloader.dataloader as loader, dataloader.datapartition as partition
loader.workspace = partition.workspace = workspace
if script == "partition":
    partition.generate_train_npy("fmnist", "labeldir0.3", 100, %d)
else:
    runpy.run_path(script, run_name="__main__")
""" % PARTITION_SEED
ROUND_END = re.compile(r"round (\d+) - server test loss:([\d.]+); acc:([\d.]+)")
CLIENT_TRAINED = re.compile(r"round (\d+) client #(\d+),")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_workspace(data_root: Path, official: Path, python: str, workspace: Path) -> dict[int, int]:
    """Fashion-MNIST where the official loaders look, its partitions made by the official code;
    returns each client's number of examples."""
    import numpy as np

    raw = workspace / "dataset" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        source = data_root / "fashion-mnist" / f"{name}.gz"
        if not source.is_file():
            sys.exit(f"official_fedmud.py: {source} is missing: set FEDLORA_DATA to the data root")
        with gzip.open(source) as f_in, open(raw / name, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
    subprocess.run([python, "-c", PRELUDE, str(official), str(workspace), "partition"], check=True,
                   stdout=subprocess.DEVNULL)
    parts = np.load(workspace / "dataloader" / "_npy_" / f"fmnist-labeldir0.3-100-{PARTITION_SEED}.npy",
                    allow_pickle=True).item()
    return {int(k): len(v) for k, v in parts.items()}


def official_run(method: str, rounds: int, official: Path, python: str, workspace: Path,
                 sizes: dict[int, int], threads: int) -> dict:
    """One run of the official code: each round's seconds, examples and test accuracy. `threads`:
    PyTorch's threads in each of its processes (0: PyTorch's default, one per core)."""
    log_dir = workspace / "log" / method
    shutil.rmtree(log_dir, ignore_errors=True)
    address = f"127.0.0.1:{free_port()}"
    server_args, client_args = OFFICIAL[method]
    start = [python, "-u", "-c", PRELUDE, str(official), str(workspace)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    server = subprocess.Popen(start + [str(official / "train" / "server.py"), *server_args, *COMMON, *SERVER,
                                       "--rounds", str(rounds), "--ip", address, "--log_dir", f"{log_dir}/"],
                              cwd=official / "run", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    clients = [subprocess.Popen(start + [str(official / "train" / "client.py"), *client_args, *COMMON, *CLIENT,
                                         "--id", str(i), "--ip", address, "--log_dir", f"{log_dir}/"],
                                cwd=official / "run", env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
               for i in range(CLIENTS_PER_ROUND)]
    ends: dict[int, tuple[float, float]] = {}
    first_round: list[float] = []
    tail: list[str] = []

    def read() -> None:
        for line in server.stdout:
            now = time.perf_counter()
            tail[:] = (tail + [line])[-30:]
            if "[ROUND 1]" in line and not first_round:
                first_round.append(now)
            if m := ROUND_END.search(line):
                ends[int(m.group(1))] = (now, float(m.group(3)))
                print(f"official {method} round {m.group(1)}: accuracy {m.group(3)}", file=sys.stderr, flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        server.wait(timeout=rounds * 600 + 300)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
        for p in clients:
            p.wait()
        reader.join(timeout=10)
    job = time.perf_counter() - started
    if server.returncode != 0 or len(ends) != rounds or not first_round:
        sys.exit(f"official_fedmud.py: the official server of {method} failed (exit {server.returncode}, "
                 f"{len(ends)} of {rounds} rounds); its last lines:\n" + "".join(tail))
    trained: dict[int, list[int]] = {}
    for log in (log_dir / "results").glob("client-*.log"):
        for m in CLIENT_TRAINED.finditer(log.read_text()):
            trained.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    marks = first_round + [ends[r][0] for r in range(1, rounds + 1)]
    return {"round_seconds": [round(b - a, 3) for a, b in zip(marks, marks[1:])],
            "round_examples": [sum(sizes[c] for c in trained.get(r, [])) for r in range(1, rounds + 1)],
            "clients_per_round": [len(trained.get(r, [])) for r in range(1, rounds + 1)],
            "test_accuracy": [ends[r][1] for r in range(1, rounds + 1)], "job_seconds": round(job, 1)}


def fedlora_run(method: str, rounds: int) -> dict:
    """One fedlora-sim run of the same setup, in this process."""
    from fedlora.config import compose, resolve
    from fedlora.federated_data import client_tensors
    from fedlora.preflight import preflight
    from strategies.strategy import sample

    cfg = resolve(compose(PAPER + METHODS[method] + [f"num_rounds={rounds}"]))
    started = time.perf_counter()
    preflight(cfg)
    rows, _ = fedlora_rounds(cfg)
    job = time.perf_counter() - started
    examples = [sum(len(client_tensors(cfg, pid)[1]) for pid in sample(range(cfg.num_clients), cfg.clients_per_round,
                                                                       cfg.seed, r))
                for r in range(1, rounds + 1)]
    return {"round_seconds": [r["round_seconds"] for r in rows], "round_examples": examples,
            "test_accuracy": [r["test_accuracy"] for r in rows], "job_seconds": round(job, 1)}


def per_example(run: dict) -> dict:
    """Milliseconds per training example per round: over all rounds, and over rounds 2 on."""
    def ms(first: int) -> float:
        return round(1000 * sum(run["round_seconds"][first:]) / sum(run["round_examples"][first:]), 3)
    return {"ms_per_example": ms(0), "ms_per_example_from_round_2": ms(1) if len(run["round_seconds"]) > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of fedmud-icml25")
    parser.add_argument("--python", default=sys.executable,
                        help="the Python of an environment with the official code's requirements")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--official-threads", type=int, default=1,
                        help="PyTorch's threads in each official process (default 1: eleven processes share the "
                             "cores; 0: PyTorch's default, one per core in each)")
    parser.add_argument("--workspace", type=Path, help="where the official code's data and logs go (a temporary "
                                                       "directory by default)")
    args = parser.parse_args()
    official = args.official.resolve()
    if not (official / "train" / "server.py").is_file():
        sys.exit(f"official_fedmud.py: {official} is not a checkout of fedmud-icml25 (no train/server.py)")
    data_root = Path(os.environ.get("FEDLORA_DATA", ROOT.parent / "shared" / "data")).resolve()
    for key, value in {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}.items():
        os.environ.setdefault(key, value)
    from fedlora.records import setup_logging

    setup_logging(stream=sys.stderr)
    commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True)
    version = subprocess.run([args.python, "-c", "import flwr, torch; print(flwr.__version__, torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.split()
    out = {"rounds": args.rounds, "official_threads": args.official_threads,
           "fedlora_setup": PAPER + [f"num_rounds={args.rounds}"],
           "official_commit": commit.stdout.strip() or None,
           "official_flwr_torch": version, "machine": f"{platform.processor() or platform.machine()}, "
                                                     f"{os.cpu_count()} cores", "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workspace = (args.workspace or Path(tmp)).resolve()
        sizes = prepare_workspace(data_root, official, args.python, workspace)
        for method in args.methods.split(","):
            if method not in OFFICIAL:
                sys.exit(f"official_fedmud.py: no official run of {method!r}; choose from {', '.join(OFFICIAL)}")
            theirs = official_run(method, args.rounds, official, args.python, workspace, sizes,
                                  args.official_threads)
            ours = fedlora_run(method, args.rounds)
            theirs |= per_example(theirs)
            ours |= per_example(ours)
            out["methods"][method] = {"official": theirs, "fedlora": ours,
                                      "speedup": round(theirs["ms_per_example"] / ours["ms_per_example"], 2)}
            print(json.dumps({method: out["methods"][method]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
