"""Deployment: a real `flower-superlink` with TLS and SuperNode authentication on 127.0.0.1, two real
`fedlora-supernode` processes (and Flower's own `flower-supernode` as a third device), and `flwr run` of
this project, as docs/deploy.md tells a user to do.
Every process is started in its own session and stopped by its id (its whole process group, so the
ServerApp and ClientApp processes that Flower spawns go with it), with bounded waits."""

from __future__ import annotations

import gzip
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, SMALL, wait_for_ray
from fedlora.certs import make_node_keys, make_tls
from fedlora.config import compose, resolve
from fedlora.simulation import run_simulation
from local_flower import BIN, Processes, free_port, nodes, wait_for_port, wait_online

CONNECTION = "fedlora-test"
OVERRIDES = ["num_clients=2", "clients_per_round=2", "num_rounds=2", "data.train_samples=1200",
             "data.test_samples=500", "local.batch_size=32", "method=fedmud_bkd_aad"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, cache_dir):
    """A SuperLink with TLS and SuperNode authentication, two registered `fedlora-supernode`s holding
    partitions 0 and 1 (as docs/deploy.md starts them; node 0 with a SuperExec secret that its
    executor signs its asks for tasks with), and a Flower config (in a temporary FLWR_HOME) naming
    the SuperLink. The nodes serve every test's runs, each from one executor process."""
    tmp = tmp_path_factory.mktemp("deploy")
    tls = make_tls(["127.0.0.1"], tmp / "certs")
    keys = make_node_keys(["node-0", "node-1", "node-2", "stranger"], tmp / "keys")
    port = free_port()
    home = tmp / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{tls["ca"]}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    procs = Processes(env, tmp)
    try:
        link = procs.start("superlink", "flower-superlink", "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile",
                           str(tls["key"]), "--ssl-ca-certfile", str(tls["ca"]), "--host", "127.0.0.1",
                           "--port", str(port), "--enable-supernode-auth", "--disable-runtime-dependency-installation")
        wait_for_port(port, link)
        for name in ("node-0", "node-1"):
            out = procs.run("flwr", "supernode", "register", str(keys[name][1]), CONNECTION, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
        (tmp / "secret").write_bytes(os.urandom(32))
        started = [
            procs.start(f"node-{i}", "fedlora-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                        str(tls["ca"]), "--auth-supernode-private-key", str(keys[f"node-{i}"][0]),
                        "--node-config", f"partition-id={i} num-threads=1", "--port", str(free_port()), *secret)
            for i, secret in ((0, ["--superexec-auth-secret-file", str(tmp / "secret")]), (1, []))]
        wait_online(procs, CONNECTION, lambda online: len(online) >= 2, "node-0")
        yield {"procs": procs, "nodes": started, "port": port, "tls": tls, "keys": keys, "tmp": tmp}
    finally:
        procs.stop()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def simulated(ray_address, tmp_path_factory) -> list[dict]:
    """The rows of OVERRIDES run in simulation."""
    run_dir = tmp_path_factory.mktemp("simulated")
    run_simulation(resolve(compose([*OVERRIDES, f"simulation.ray_address={ray_address}"])), run_dir)
    return rows(run_dir)


def assert_same_rounds(deployed: list[dict], simulated: list[dict]) -> None:
    for d, s in zip(deployed, simulated, strict=True):
        for key in ("round", "num_clients", "bytes_up", "bytes_down", "test_accuracy"):
            assert d[key] == s[key], key
        assert d["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4)


def executor_tasks(log: str) -> list[tuple[str, str]]:
    """(task type, executor process) of each task a `fedlora-supernode`'s log names."""
    return [(line.split("(")[1].split(")")[0], line.rsplit("in process ", 1)[1])
            for line in log.splitlines() if " fedlora | task " in line]


def test_flwr_run_writes_the_same_records_as_the_simulation(federation, simulated, tmp_path):
    """The records of the simulation, and each node's tasks (the opening query and both rounds'
    training) all run in its one executor process, which stays up after the run."""
    procs = federation["procs"]
    run_dir = tmp_path / "deployed"
    overrides = " ".join(OVERRIDES)
    before = {i: executor_tasks(procs.log(f"node-{i}")) for i in (0, 1)}
    out = procs.run("flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config",
                    f'overrides="{overrides}" run-dir="{run_dir}"', timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "round 2/2" in out.stdout  # progress streams back to the user's terminal

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    deployed = rows(run_dir)
    per_client = summary["compression"]["uplink_bytes_per_client"]
    assert [r["bytes_up"] for r in deployed] == [2 * per_client] * 2  # only the trained factors came back
    assert all(r["num_clients"] == 2 and r["rejected"] == 0 for r in deployed)
    assert sum(json.loads((run_dir / "partitions.json").read_text())["sizes"]) == 1200

    # the same overrides in simulation: the same config, the same rounds, the same bytes
    assert_same_rounds(deployed, simulated)
    for i in (0, 1):
        tasks = executor_tasks(procs.log(f"node-{i}"))
        assert [t for t, _ in tasks[len(before[i]):]] == ["query", "train", "train"], procs.log(f"node-{i}")[-3000:]
        assert len({p for _, p in tasks}) == 1
    assert "EXPERIMENTAL: SuperExec authentication" in procs.log("node-0")  # node 0 enforced its secret, was served
    assert all(node.poll() is None for node in federation["nodes"])  # the nodes and their executors are still up


def test_a_deployed_run_resumed_through_flwr_run_goes_on_as_if_never_stopped(federation, simulated, tmp_path):
    """One round under `flwr run`, then `resume=` in the overrides of a second `flwr run` to round 2,
    on the same SuperLink and SuperNodes (which hold nothing of the first run): the records of the
    run that was never stopped."""
    procs = federation["procs"]
    run_dir = tmp_path / "stopped"
    first = " ".join(o for o in OVERRIDES if not o.startswith("num_rounds=")) + " num_rounds=1"
    out = procs.run("flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config",
                    f'overrides="{first}" run-dir="{run_dir}"', timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    out = procs.run("flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config",
                    f'overrides="resume={run_dir} num_rounds=2"', timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed after round 1 of 2" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert_same_rounds(rows(run_dir), simulated)


def test_a_bad_run_config_is_reported_plainly(federation, tmp_path):
    out = federation["procs"].run("flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config",
                                  f'overrides="method=nosuchmethod" run-dir="{tmp_path}/bad"', timeout=300)
    assert "fedlora: error:" in out.stdout + out.stderr and "nosuchmethod" in out.stdout + out.stderr


def test_unregistered_or_untrusting_supernodes_cannot_join(federation, tmp_path):
    procs, port = federation["procs"], federation["port"]
    known = {n["node-id"] for n in nodes(procs, CONNECTION)}
    other_ca = make_tls(["127.0.0.1"], tmp_path / "other")["ca"]
    common = ["--superlink", f"127.0.0.1:{port}", "--max-retries", "1", "--max-wait-time", "10",
              "--node-config", "partition-id=1"]
    # a valid certificate chain but a key the SuperLink never registered
    stranger = procs.start("stranger", "flower-supernode", *common, "--root-certificates", str(federation["tls"]["ca"]),
                           "--auth-supernode-private-key", str(federation["keys"]["stranger"][0]),
                           "--port", str(free_port()))
    # a registered key, but it does not trust the SuperLink's certificate authority
    untrusting = procs.start("untrusting", "flower-supernode", *common, "--root-certificates", str(other_ca),
                             "--auth-supernode-private-key", str(federation["keys"]["node-1"][0]),
                             "--port", str(free_port()))
    for proc in (stranger, untrusting):
        assert proc.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in procs.log("stranger")
    assert "CERTIFICATE_VERIFY_FAILED" in procs.log("untrusting")
    assert {n["node-id"] for n in nodes(procs, CONNECTION)} == known  # nobody new got in


def test_a_node_with_its_own_data_joins_then_drops_out(federation, tmp_path):
    """A third device, registered while the others run, on Flower's own `flower-supernode` (a new
    ClientApp process for every message), trains on its own 300 images: the server
    learns their number, not their labels, and weighs its reply by it. Killed once round 1 is in, it
    is answered for by the SuperLink with an error: the server counts it rejected, names it, and
    aggregates the others."""
    procs, port = federation["procs"], federation["port"]
    src = Path(os.environ["FEDLORA_DATA"]) / "fashion-mnist"
    own = tmp_path / "own" / "fashion-mnist"
    own.mkdir(parents=True)
    n = 300  # the first 300 training images, in the IDX format of the shared copy (its header counting 300)
    images = gzip.decompress((src / "train-images-idx3-ubyte.gz").read_bytes())[:16 + n * 784]
    labels = gzip.decompress((src / "train-labels-idx1-ubyte.gz").read_bytes())[:8 + n]
    images, labels = (data[:4] + n.to_bytes(4, "big") + data[8:] for data in (images, labels))
    (own / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(images))
    (own / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    out = procs.run("flwr", "supernode", "register", str(federation["keys"]["node-2"][1]), CONNECTION, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    node_2 = procs.start("node-2", "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                         str(federation["tls"]["ca"]), "--auth-supernode-private-key",
                         str(federation["keys"]["node-2"][0]), "--node-config",
                         f'partition-id=2 num-partitions=3 num-threads=1 local-data="{tmp_path / "own"}"',
                         "--port", str(free_port()))
    wait_online(procs, CONNECTION, lambda online: len(online) >= 3, "node-2")
    try:
        # it was told of 3 partitions: a run of 4 stops before the first round, and says why
        out = procs.run("flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config",
                        f'overrides="num_clients=4 clients_per_round=3" run-dir="{tmp_path}/mismatch"', timeout=300)
        assert "num-partitions=3, the run has num_clients=4" in out.stdout + out.stderr

        run_dir = tmp_path / "run"
        overrides = "num_clients=3 clients_per_round=3 num_rounds=3 data.train_samples=900 data.test_samples=500"
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), CONNECTION, "--stream", "--run-config",
                                f'overrides="{overrides}" run-dir="{run_dir}"'], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=procs.env, start_new_session=True)
        procs.started.append(run)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in run.stdout], daemon=True).start()
        seen = ""
        deadline = time.time() + 300
        while "round 1/3" not in seen:
            assert time.time() < deadline and run.poll() is None, seen[-3000:]
            try:
                seen += lines.get(timeout=1)
            except queue.Empty:
                pass
        os.killpg(node_2.pid, signal.SIGKILL)
        assert run.wait(timeout=300) == 0
        while not lines.empty():
            seen += lines.get()
    finally:
        if node_2.poll() is None:
            os.killpg(node_2.pid, signal.SIGKILL)
    parts = json.loads((run_dir / "partitions.json").read_text())
    assert parts["own_data"] == [2] and parts["sizes"][2] == n and parts["class_counts"][2] is None
    assert parts["class_counts"][0] is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    metrics = [(r["num_clients"], r["rejected"]) for r in rows(run_dir)]
    assert metrics[0] == (3, 0)  # its reply claimed its own 300 examples and was taken
    assert metrics[-1] == (2, 1) and all(a + r == 3 for a, r in metrics)  # round 2 may have beaten the kill
    assert "rejected the reply of client 2" in seen and "Node Unavailable" in seen, seen[-3000:]


def test_nodes_with_their_own_files_and_a_server_without_training_data(federation, tmp_path):
    """Two more devices train on their own text files (CSV and Parquet) under data.on_nodes=true: the
    server reads a test file alone, or, with the clients evaluating, no file at all; it sends the
    nodes the run's class names, and the nodes of the shared data set (partitions 0 and 1) take no
    part. Placed after the tests that count the federation's nodes."""
    import pandas as pd

    from fedlora.text import AGNEWS_LABELS, read_agnews

    procs, port = federation["procs"], federation["port"]
    texts, labels = read_agnews(os.environ["FEDLORA_DATA"], "train")
    frame = pd.DataFrame({"text": texts[:200], "label": [AGNEWS_LABELS[i] for i in labels[:200]]})
    (tmp_path / "node-a").mkdir(), (tmp_path / "node-b").mkdir(), (tmp_path / "server").mkdir()
    frame[:80].to_csv(tmp_path / "node-a" / "mine.csv", index=False)
    frame[80:150].to_parquet(tmp_path / "node-b" / "mine.parquet")
    frame[150:].to_json(tmp_path / "server" / "test.jsonl", orient="records", lines=True)
    keys = make_node_keys(["own-a", "own-b"], tmp_path / "keys")
    started, ids = [], set()
    for pid, name, own in ((2, "own-a", "node-a/mine.csv"), (3, "own-b", "node-b/mine.parquet")):
        out = procs.run("flwr", "supernode", "register", str(keys[name][1]), CONNECTION, "--format", "json",
                        timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        ids.add(str(json.loads(out.stdout)["node-id"]))
        started.append(procs.start(name, "fedlora-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                                   str(federation["tls"]["ca"]), "--auth-supernode-private-key", str(keys[name][0]),
                                   "--node-config", f'partition-id={pid} num-threads=1 local-data="{tmp_path / own}"',
                                   "--port", str(free_port())))
    try:
        wait_online(procs, CONNECTION, lambda online: ids <= {n["node-id"] for n in online}, "own-a")
        base = ("dataset=hf data.on_nodes=true model.num_layers=1 model.max_length=32 adapter=lora method=fedit "
                "num_clients=4 clients_per_round=2 num_rounds=2 local.batch_size=16")
        runs = {"test-file": f"{base} dataset.path={tmp_path / 'server' / 'test.jsonl'}",
                "no-file": f"{base} eval.clients=true dataset.labels=[{','.join(AGNEWS_LABELS)}]"}
        for name, overrides in runs.items():
            out = procs.run("flwr", "run", str(ROOT), CONNECTION, "--stream", "--run-config",
                            f'overrides="{overrides}" run-dir="{tmp_path / name}"', timeout=400)
            summary = json.loads((tmp_path / name / "summary.json").read_text())
            assert summary["status"] == "completed", out.stdout[-3000:] + out.stderr[-3000:]
            assert "partitions [0, 1] have no local-data" in out.stdout + out.stderr
            parts = json.loads((tmp_path / name / "partitions.json").read_text())
            assert parts["own_data"] == [2, 3]  # the clients evaluate on a fifth of their data, train on the rest
            assert parts["sizes"][2:] == ([64, 56] if name == "no-file" else [80, 70])
            assert all(r["num_clients"] == 2 for r in rows(tmp_path / name))
        with_file = json.loads((tmp_path / "test-file" / "summary.json").read_text())
        assert with_file["labels"] == sorted(set(frame["label"][150:])) and 0 <= with_file["final_accuracy"] <= 1
        no_file = json.loads((tmp_path / "no-file" / "summary.json").read_text())
        assert no_file["labels"] == list(AGNEWS_LABELS) and no_file["final_accuracy"] is None
        assert all(r["test_accuracy"] is None and r["clients_evaluated"] == 2 for r in rows(tmp_path / "no-file"))
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_virtual_clients_spread_over_a_ray_cluster(tmp_path):
    """`ray start --head` offering no CPU, and a worker joining it with two: a run given the head's
    address can only place its virtual clients on the worker, as on a cluster of machines."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="rayc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    procs = Processes(os.environ.copy(), tmp_path)
    try:
        deadline = time.time() + 120
        head = procs.start("ray-head", "ray", "start", "--block", "--disable-usage-stats", "--head", f"--port={port}",
                           "--num-cpus=0", "--include-dashboard=false", f"--temp-dir={temp_dir}")
        wait_for_ray(address, head, deadline)
        worker = procs.start("ray-worker", "ray", "start", "--block", "--disable-usage-stats", f"--address={address}",
                             "--num-cpus=2")
        wait_for_ray(address, worker, deadline, showing="2.0 CPU")
        run_dir = tmp_path / "run"
        out = subprocess.run([str(BIN / "fedlora-sim"), *SMALL, f"simulation.ray_address={address}",
                              f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    finally:
        procs.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.parametrize("env_name", ["venv", "fl-gpu"])
def test_flwr_packages_the_project_with_a_virtual_environment_inside(env_name, tmp_path):
    """Many users make their environment inside the project, under a name of their own; `flwr run .`
    packages the project with it there. The environment holds what `pip install numpy` leaves in any
    environment: files nested deeper than Flower allows in an app."""
    import numpy

    project = tmp_path / "project"
    shutil.copytree(ROOT, project, ignore=shutil.ignore_patterns(".git", ".venv*", "outputs", "multirun", "__pycache__",
                                                                "*.egg-info", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(project / env_name)], check=True, timeout=120)
    (site,) = (project / env_name).glob("lib/python3*/site-packages")
    installed = Path(numpy.__file__).parents[1]
    for dist_info in installed.glob("numpy-*.dist-info"):
        shutil.copytree(dist_info, site / dist_info.name)
    assert max(len(p.relative_to(project).parts) for p in site.rglob("*")) > 11  # deeper than Flower's limit
    out = subprocess.run([str(BIN / "flwr"), "build", "--app", str(project)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "fedlora/config.py" in names and "clients/client_app.py" in names
    assert not any(n.startswith(env_name + "/") for n in names)


def test_an_executor_without_the_nodes_secret_is_refused_and_says_so(tmp_path):
    """A SuperNode given a SuperExec secret hands its tasks only to an executor that signs its asks
    with it: `fedlora-superexec` without it stops with an error that says so (Flower's retries answer
    the refusal by interrupting the process, which would end it without a word)."""
    (tmp_path / "secret").write_bytes(os.urandom(32))
    procs = Processes(os.environ.copy(), tmp_path)
    api = free_port()
    try:
        node = procs.start("node", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{free_port()}",
                           "--isolation", "process", "--superexec-auth-secret-file", str(tmp_path / "secret"),
                           "--port", str(api), "--node-config", "partition-id=0")
        wait_for_port(api, node)  # its Runtime API serves while it looks for a SuperLink
        out = procs.run("fedlora-superexec", "--insecure", "--runtime-api-address", f"127.0.0.1:{api}", timeout=120)
        assert out.returncode == 1 and "SuperExec authentication failed" in out.stderr, out.stderr[-2000:]
    finally:
        procs.stop()


def test_a_fedlora_supernode_whose_executor_dies_stops_and_says_so(tmp_path):
    """A node without its executor would take tasks and never answer them: when the executor is
    killed, `fedlora-supernode` stops, with an error and exit status 1. Its own stop (SIGTERM to its
    process group, which the executor gets too) is a clean one."""
    procs = Processes(os.environ.copy(), tmp_path)
    try:
        for name in ("killed", "stopped"):
            node = procs.start(name, "fedlora-supernode", "--insecure", "--superlink", f"127.0.0.1:{free_port()}",
                               "--port", str(free_port()), "--node-config", "partition-id=0")
            deadline = time.time() + 60
            while "in process " not in procs.log(name):  # the executor's first line names its pid
                assert time.time() < deadline and node.poll() is None, procs.log(name)[-2000:]
                time.sleep(0.5)
            executor = int(procs.log(name).split("in process ", 1)[1].split()[0])
            if name == "killed":
                os.kill(executor, signal.SIGKILL)
            else:
                os.killpg(node.pid, signal.SIGTERM)
            assert node.wait(timeout=60) == (1 if name == "killed" else 0), procs.log(name)[-2000:]
            assert ("its executor ended" in procs.log(name)) == (name == "killed")
    finally:
        procs.stop()
