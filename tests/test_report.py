"""fedlora-report on the run directories of a real Hydra multirun (2 configs x 2 seeds x 2 rounds),
checked against the runs' own metrics.jsonl; and its answers to bad input."""

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, SMALL
from fedlora.config import compose, register_schema, resolve
from fedlora.errors import ConfigError, FedloraError
from fedlora.ledger import Ledger
from fedlora.records import RunRecorder
from fedlora.report import Run, Stat, label_keys, label_of, make_report
from fedlora.simulation import end_kept_actors

BIN = Path(sys.executable).parent
CONFIGS = ("fedavg", "fedmud_bkd_aad")
SEEDS = (1, 2)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def report(*args):
    return subprocess.run([str(BIN / "fedlora-report"), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def sweep(ray_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    end_kept_actors()  # the head's CPUs, which this process's last run left to its next one
    proc = subprocess.run(
        [str(BIN / "fedlora-sim"), "-m", f"method={','.join(CONFIGS)}", f"seed={','.join(map(str, SEEDS))}",
         *SMALL, f"simulation.ray_address={ray_address}", f"hydra.sweep.dir={out}"],
        capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {}
    for d in out.iterdir():
        if (d / "metrics.jsonl").exists():
            cfg = OmegaConf.load(d / "config.yaml")
            runs[(cfg.method.name, cfg.seed)] = d
    assert set(runs) == {(c, s) for c in CONFIGS for s in SEEDS}
    return out, runs


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def mean_std(values):
    return statistics.fmean(values), statistics.stdev(values)


def test_the_table_holds_the_runs_numbers(sweep, tmp_path):
    out, runs = sweep
    finals = sorted(metrics(d)[-1]["test_accuracy"] for d in runs.values())
    target = (finals[1] + finals[2]) / 2  # some runs reach it, some do not
    proc = report(out, "--target-accuracy", target, "-o", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "rep")  # the folder, on the last line
    rows = {r["method.name"]: r for r in read_csv(tmp_path / "rep" / "table.csv")}
    assert set(rows) == set(CONFIGS)
    for config, row in rows.items():
        ms = [metrics(runs[(config, s)]) for s in SEEDS]
        assert (row["status"], row["runs"], row["seeds"], row["rounds"]) == ("completed", "2", "1 2", "2")
        for col, values in {
            "final_accuracy": [m[-1]["test_accuracy"] for m in ms],
            "best_accuracy": [max(r["test_accuracy"] for r in m) for m in ms],
            "bytes_up": [m[-1]["cum_bytes_up"] for m in ms],
            "bytes_down": [sum(r["bytes_down"] for r in m) for m in ms],
        }.items():
            mean, std = mean_std(values)
            assert float(row[f"{col}_mean"]) == pytest.approx(mean, rel=1e-9)
            assert float(row[f"{col}_std"] or 0) == pytest.approx(std, abs=1e-9)
        hits = [next((r for r in m if r["test_accuracy"] >= target), None) for m in ms]
        assert int(row["runs_reaching_target"]) == sum(h is not None for h in hits)
        if all(hits):
            assert float(row["bytes_up_to_target_mean"]) == statistics.fmean(h["cum_bytes_up"] for h in hits)
            assert float(row["rounds_to_target_mean"]) == statistics.fmean(h["round"] for h in hits)
        else:
            assert row["bytes_up_to_target_mean"] == ""
        walls = [json.loads((runs[(config, s)] / "summary.json").read_text())["total_seconds"] for s in SEEDS]
        assert float(row["wall_seconds_mean"]) == pytest.approx(statistics.fmean(walls))
    md = (tmp_path / "rep" / "table.md").read_text()
    # the methods name the rows; their own learning rates are columns of the CSV, not part of the name
    assert "| method=fedavg |" in md and "| method=fedmud_bkd_aad |" in md
    assert rows["fedavg"]["local.lr"] == "0.03" and rows["fedmud_bkd_aad"]["local.lr"] == "0.01"
    assert "not reached" in md  # the target splits the runs
    for name in ("accuracy_vs_uplink", "accuracy_vs_downlink", "accuracy_vs_rounds"):
        png = (tmp_path / "rep" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        svg = (tmp_path / "rep" / f"{name}.svg").read_text()
        assert "<svg" in svg and svg.count("<path") > 10


def test_tensorboard_events_hold_the_rounds(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, runs = sweep
    run_dir = runs[("fedavg", 1)]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    acc = [(e.step, e.value) for e in events.Scalars("test/accuracy")]
    ms = metrics(run_dir)
    assert [s for s, _ in acc] == [0, 1, 2]  # round 0 is the initial model
    assert [v for _, v in acc[1:]] == pytest.approx([r["test_accuracy"] for r in ms], abs=1e-6)
    assert [e.value for e in events.Scalars("bytes/cum_up")] == [r["cum_bytes_up"] for r in ms]


def test_a_partial_run_is_marked_and_not_averaged(sweep, tmp_path):
    out, runs = sweep
    tree = tmp_path / "runs"
    shutil.copytree(out, tree, ignore=shutil.ignore_patterns("report"))
    # a third seed of fedavg that was interrupted after its first round
    cut = tree / "interrupted"
    shutil.copytree(runs[("fedavg", 1)], cut)
    (cut / "config.yaml").write_text((cut / "config.yaml").read_text().replace("seed: 1", "seed: 3"))
    first = (cut / "metrics.jsonl").read_text().splitlines()[0]
    (cut / "metrics.jsonl").write_text(first + "\n" + '{"round": 2, "test_acc')  # killed mid-line
    summary = json.loads((cut / "summary.json").read_text()) | {"status": "interrupted", "rounds_completed": 1}
    (cut / "summary.json").write_text(json.dumps(summary))
    warnings = []
    folder, table = make_report([tree], warn=warnings.append)
    rows = read_csv(folder / "table.csv")
    iid = [r for r in rows if r["method.name"] == "fedavg"]
    assert [(r["status"], r["runs"], r["seeds"]) for r in iid] == [
        ("completed", "2", "1 2"), ("interrupted after 1/2 rounds", "1", "3")]
    finals = [metrics(runs[("fedavg", s)])[-1]["test_accuracy"] for s in SEEDS]
    assert float(iid[0]["final_accuracy_mean"]) == pytest.approx(statistics.fmean(finals))
    assert float(iid[1]["final_accuracy_mean"]) == json.loads(first)["test_accuracy"]
    assert "**interrupted after 1/2 rounds**" in table
    assert any("cut short" in w for w in warnings) and any("not averaged" in w for w in warnings)


def test_mixed_datasets_need_an_explicit_grouping(sweep, tmp_path):
    _, runs = sweep
    for name, src in (("a", runs[("fedavg", 1)]), ("b", runs[("fedavg", 2)])):
        shutil.copytree(src, tmp_path / name)
    config = tmp_path / "b" / "config.yaml"
    config.write_text(config.read_text().replace("name: fmnist", "name: cifar10"))
    with pytest.raises(FedloraError, match=r"different datasets \(cifar10: 1 runs, fmnist: 1 runs\)"):
        make_report([tmp_path / "a", tmp_path / "b"])
    folder, table = make_report([tmp_path / "a", tmp_path / "b"], group_by=["dataset.name"], warn=lambda m: None)
    assert folder == tmp_path / "report" and "dataset=cifar10" in table and "dataset=fmnist" in table


def test_bad_input_gets_a_message_not_a_traceback(tmp_path, sweep):
    (tmp_path / "empty").mkdir()
    proc = report(tmp_path / "empty")
    assert proc.returncode == 2 and "no fedlora runs under" in proc.stderr and "Traceback" not in proc.stderr
    proc = report(tmp_path / "nowhere")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    out, _ = sweep
    proc = report(out, "--target-accuracy", "85")
    assert proc.returncode == 2 and "must be in (0, 1]" in proc.stderr
    proc = report(out, "--group-by", "method.nme")
    assert proc.returncode == 2 and "no run has the key(s) method.nme" in proc.stderr


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    proc = subprocess.run([str(BIN / "fedlora-sim"), "-m", "num_clients=4", "clients_per_round=8,9",
                           f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "(got 8)" in proc.stderr and "(got 9)" in proc.stderr  # the second job ran after the first failed
    assert "2 run(s) of the sweep failed" in proc.stderr and "Traceback" not in proc.stderr


def test_labels_name_what_the_names_do_not_fix():
    def run(partition, alpha, lr):
        return Run(Path("."), {"partition.name": partition, "partition.alpha": alpha, "local.lr": lr}, [], None)

    keys = ["partition.name", "partition.alpha", "local.lr"]
    # alpha is fixed by the partition's name, lr varies within a name
    runs = [run("iid", None, 0.1), run("dirichlet", 0.3, 0.1), run("iid", None, 0.2), run("dirichlet", 0.3, 0.2)]
    assert label_keys(runs, keys) == ["partition.name", "local.lr"]
    runs = [run("dirichlet", 0.1, 0.1), run("dirichlet", 0.3, 0.1)]
    assert label_keys(runs, keys) == ["partition.name", "partition.alpha"]


def test_labels_and_statistics():
    assert label_of({"method.name": "fedmud", "method.compression_ratio": 0.03125, "local.lr": None}) == \
        "method=fedmud, method.compression_ratio=0.03125, local.lr=null"
    assert label_of({}) == "all runs"
    s = Stat.of([0.8, 0.9, float("nan"), None])
    assert s.n == 2 and s.mean == pytest.approx(0.85) and s.std == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert Stat.of([3.0]).std is None and Stat.of([]).text(str) == "n/a"


def test_tensorboard_can_be_switched_off(tmp_path):
    rec = RunRecorder(tmp_path, resolve(compose(["tensorboard=false"])), Ledger())
    rec.record_initial(0.1, 2.3)
    rec.close("completed")
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="tensorboard must be auto, true or false"):
        resolve(compose(["tensorboard=maybe"]))


EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes_each_of_its_jobs(name):
    import itertools

    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_schema()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        params = hydra_compose("config", [f"experiment={name}"], return_hydra_config=True).hydra.sweeper.params
    assert params, f"{name} sweeps nothing"
    axes = [[f"{k}={v}" for v in str(vals).split(",")] for k, vals in params.items()]
    for job in itertools.product(*axes):
        # download=true: a data set not on this machine would be fetched at run time, not here
        cfg = resolve(compose([f"experiment={name}", *job, "data.download=true"]))
        assert cfg.num_rounds >= 10


def test_reading_the_records_needs_no_torch():
    """fedlora-report and what it reads (records, ledger) import no torch: 0.3-0.5 GB and 2 s."""
    proc = subprocess.run([sys.executable, "-c", "import sys, fedlora.report; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]
