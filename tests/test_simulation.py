"""Real Flower simulations on Ray virtual clients over a small Fashion-MNIST subset."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SMALL, built
from fedlora.config import compose, resolve
from fedlora.simulation import end_kept_actors, run_simulation
from fedlora.partition import class_histogram
from fedlora.federated_data import federated_data
from fedlora.records import without_times

sys.path.insert(0, str(ROOT / "benchmarks"))
from reference_fedavg import reference_fedavg  # noqa: E402

CLI = str(Path(sys.executable).with_name("fedlora-sim"))
KEYS = {"round", "test_accuracy", "test_loss", "train_loss", "num_clients", "rejected", "failed", "timed_out", "bytes_up",
        "bytes_down", "cum_bytes_up", "cum_bytes_down", "round_seconds", "train_seconds", "aggregate_seconds", "eval_seconds",
        "slowest_client_seconds", "all_clients_seconds"}


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_time(metrics):
    return [without_times(r) for r in metrics]


@pytest.fixture(scope="module")
def cli_run(ray_address, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli-run")
    end_kept_actors()  # the head's CPUs, which this process's last run left to its next one
    proc = subprocess.run([CLI, *SMALL, f"simulation.ray_address={ray_address}", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


def test_cli_run_writes_the_records(cli_run):
    run_dir, stdout = cli_run
    metrics = rows(run_dir)
    assert [r["round"] for r in metrics] == [1, 2] and all(set(r) == KEYS for r in metrics)
    for r in metrics:  # the breakdown of a round's time: parts of it, the clients' within the wait for them
        assert r["train_seconds"] + r["aggregate_seconds"] + r["eval_seconds"] <= r["round_seconds"] + 0.01
        assert 0 < r["slowest_client_seconds"] <= r["all_clients_seconds"] and r["slowest_client_seconds"] <= r["train_seconds"]
    cfg = resolve(compose(SMALL))
    _, model = built(cfg)
    # each sampled client gets every float state tensor (float32 + numpy's 128-byte header) and returns it
    per_client = sum(v.numel() * 4 + 128 for v in model.state_dict().values() if v.is_floating_point())
    for r in metrics:
        assert r["num_clients"] == 2 and r["rejected"] == 0
        assert r["bytes_down"] == r["bytes_up"] == 2 * per_client
        assert 0 <= r["test_accuracy"] <= 1 and r["train_loss"] > 0
    assert metrics[1]["cum_bytes_up"] == 4 * per_client
    assert metrics[1]["test_accuracy"] > 0.3  # learnt something from 1200 samples
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["final_accuracy"] == metrics[-1]["test_accuracy"]
    assert summary["best_accuracy"] == max(r["test_accuracy"] for r in metrics)
    assert summary["total_bytes_up"] == summary["total_bytes_down"] == 4 * per_client
    parts = json.loads((Path(run_dir) / "partitions.json").read_text())
    train, _, used = federated_data(cfg)
    assert parts["class_counts"] == class_histogram(train.labels, used, 10) and sum(parts["sizes"]) == 1200
    assert "num_clients: 4" in (Path(run_dir) / "config.yaml").read_text()
    assert "round 2/2" in stdout and "acc" in stdout and "up" in stdout
    # only fedlora's own lines by default: Flower's and Ray's logs need verbose=true
    assert all(" fedlora | " in line for line in stdout.splitlines()), stdout[:2000]


def test_same_seed_same_metrics_and_the_reference_loop_agrees(cli_run, ray_address, tmp_path):
    cfg = resolve(compose(SMALL + [f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path)
    first, second = rows(cli_run[0]), rows(tmp_path)
    assert without_time(first) == without_time(second)
    reference = reference_fedavg(cfg)
    assert len(reference) == len(second) == 2
    for r, ref in zip(second, reference):
        assert abs(r["test_accuracy"] - ref) <= 0.005


def test_runs_one_after_another_share_their_client_actors_then_end_them_when_idle(ray_address, tmp_path,
                                                                                monkeypatch):
    """As a sweep's jobs: the next run's clients train in the actors the last run left idle, and its
    records are the last run's (the same config); actors idle longer than KEEP_ACTORS_S are ended."""
    import ray

    from fedlora import simulation

    cfg = resolve(compose(SMALL + ["num_rounds=1", f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path / "a")
    kept = list(simulation._KEPT["actors"])
    assert len(kept) == 2  # both of the session head's CPUs, one actor each, idle
    monkeypatch.setattr(simulation, "KEEP_ACTORS_S", 0.5)
    run_simulation(cfg, tmp_path / "b")
    assert {a._actor_id for a in simulation._KEPT["actors"]} == {a._actor_id for a in kept}
    assert without_time(rows(tmp_path / "a")) == without_time(rows(tmp_path / "b"))
    time.sleep(2)
    assert simulation._KEPT["actors"] == []
    for actor in kept:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)


def test_diverging_clients_are_rejected_and_the_model_kept(ray_address, tmp_path):
    cfg = resolve(compose(SMALL + ["num_rounds=1", "local.lr=1e8", f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path)
    (row,) = rows(tmp_path)
    assert row["rejected"] == 2 and row["num_clients"] == 0 and row["train_loss"] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert row["test_accuracy"] == summary["initial_accuracy"]  # global model unchanged
    from strategies.strategy import sample

    assert summary["clients_never_accepted"] == sample(range(cfg.num_clients), cfg.clients_per_round, cfg.seed, 1)
    assert all("non-finite" in summary["client_replies"][str(p)]["last"] for p in summary["clients_never_accepted"])


def test_a_run_with_30_percent_of_its_clients_failing_completes_every_round(ray_address, tmp_path):
    """simulation.faults: each round 3 of the 10 sampled clients raise and 1 replies after the round's
    timeout; the other 6 are aggregated, and metrics.jsonl counts each kind."""
    cfg = resolve(compose(SMALL + ["num_clients=10", "clients_per_round=10", "simulation.faults.fail_rate=0.3",
                                   "simulation.faults.straggle_rate=0.1", "simulation.round_timeout=15",
                                   f"simulation.ray_address={ray_address}"]))
    run_simulation(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    for row in rows(tmp_path):
        assert (row["num_clients"], row["failed"], row["rejected"], row["timed_out"]) == (6, 3, 3, 1)
        assert row["train_loss"] > 0
    assert rows(tmp_path)[-1]["test_accuracy"] != summary["initial_accuracy"]
    assert "clients_never_accepted" not in summary or len(summary["clients_never_accepted"]) < 10


def test_ctrl_c_keeps_the_completed_rounds(tmp_path):
    # As from a terminal: SIGINT to the whole process group, with a local Ray that the run starts.
    proc = subprocess.Popen([CLI, *SMALL, "num_rounds=50", "simulation.ray_num_cpus=2", f"hydra.run.dir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
                            start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    done = rows(tmp_path)
    assert summary["status"] == "interrupted" and 1 <= summary["rounds_completed"] == len(done) < 50
    # the interrupted round's messages count too
    assert summary["total_bytes_down"] >= done[-1]["cum_bytes_down"]


def test_the_simulations_message_delivery_takes_what_flowers_loop_takes_in_its_order():
    """fedlora's replacement of Flower 1.41's delivery loop (simulation._deliver_pending): one pass over
    a link state holding several messages for some nodes and none for others queues the messages
    that Flower's own pass queues, and marks the same ones delivered; in the order they were pushed
    (Flower's: by node)."""
    import threading
    from queue import Queue

    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.simulation import _deliver_pending, _use_scalable_delivery

    class OnePass(threading.Event):  # the loop stops after its first pass
        def wait(self, timeout=None):
            self.set()
            return True

    def one_pass(deliver):
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        nodes = vce_api._register_nodes(num_nodes=6, state_factory=factory)
        state = factory.state()
        run = Run.create_empty(run_id=7)
        run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
        state.run_ids[run.run_id] = RunRecord(run=run)
        state.task_store[1] = Task(task_id=1, run_id=run.run_id)
        grid = InMemoryGrid(state_factory=factory)
        grid.set_run(run)
        identity = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
        ids = list(nodes)
        to = [ids[4], ids[1], ids[4], ids[0], ids[5], ids[1]]  # two each for nodes 4 and 1, none for 2 and 3
        try:  # the identity that Flower's simulation gives its ServerApp, as it is pushing
            grid.push_messages([Message(RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=n,
                                        message_type="query") for i, n in enumerate(to)])
        finally:
            TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = identity
        queue = Queue()
        deliver(state, queue, nodes, OnePass())
        got = [(nodes[m.metadata.dst_node_id], int(m.content["c"]["i"])) for m in list(queue.queue)]  # by partition
        left = sorted(int(m.content["c"]["i"]) for m in state.message_ins_store.values() if m.metadata.delivered_at == "")
        return got, left

    flowers = one_pass(vce_api.__dict__.get("_flower_add_messages_to_queue", vce_api.add_messages_to_queue))
    ours = one_pass(_deliver_pending)
    assert flowers == ([(0, 3), (1, 1), (4, 0), (5, 4)], [2, 5])  # by node
    assert ours == ([(4, 0), (1, 1), (0, 3), (5, 4)], [2, 5])  # the same ones, as pushed
    _use_scalable_delivery()  # what run_simulation puts in place: ours, for the in-memory state
    assert one_pass(vce_api.add_messages_to_queue) == ours


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU")
def test_a_share_of_a_gpu_on_a_machine_without_one_is_a_config_error_before_ray_starts(tmp_path):
    proc = subprocess.run([CLI, *SMALL, "simulation.client_resources.num_gpus=0.5", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "num_gpus=0.5 asks a share of a GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
    # on a Ray cluster the GPUs may be on the workers alone: nothing to check here
    from fedlora.simulation import backend_config

    cfg = resolve(compose([*SMALL, "simulation.client_resources.num_gpus=0.5", "simulation.ray_address=auto"]))
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.5
