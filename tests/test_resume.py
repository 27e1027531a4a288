"""Checkpoints and resuming: a run stopped after round k and resumed writes the same metrics.jsonl
(accuracy, losses, bytes) as the run that was never stopped; the checkpoint survives a kill at any
instant; a resume with another config is refused, naming the keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import PRESETS, SMALL, metrics_rows
from fedlora.checkpoint import CHECKPOINT_DIR, INDEX, Checkpoint, read_checkpoint, resumed_config, write_checkpoint
from fedlora.config import compose, resolve
from fedlora.errors import ConfigError
from fedlora.records import without_times
from fedlora.simulation import end_kept_actors, run_simulation


def measured(rows):
    """What a resumed run must reproduce: every figure of every round but its wall-clock time."""
    return [without_times(r) for r in rows]


# --- the files ---------------------------------------------------------------------------------------

def test_a_checkpoint_reads_back_as_written_and_only_the_last_state_is_kept(tmp_path):
    rng = np.random.default_rng(0)
    for server_round in (1, 2):
        arrays = {"layer.weight": rng.normal(size=(3, 4)).astype(np.float32), "bn.mean": np.arange(4.0)}
        write_checkpoint(tmp_path, Checkpoint(round=server_round, arrays=arrays, total_up=10 * server_round,
                                              rounds=[{"round": 1, "train_loss": float("nan")}]))
    back = read_checkpoint(tmp_path)
    assert back.round == 2 and back.total_up == 20
    assert all(np.array_equal(back.arrays[k], arrays[k]) and back.arrays[k].dtype == arrays[k].dtype for k in arrays)
    assert np.isnan(back.rounds[0]["train_loss"])
    assert [p.name for p in (tmp_path / CHECKPOINT_DIR).glob("state-*")] == ["state-00002.safetensors"]


def test_a_missing_or_damaged_checkpoint_is_a_plain_error(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint there"):
        read_checkpoint(tmp_path)
    write_checkpoint(tmp_path, Checkpoint(round=1, arrays={"w": np.zeros(2, np.float32)}))
    (tmp_path / CHECKPOINT_DIR / "state-00001.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(ConfigError, match="damaged"):
        read_checkpoint(tmp_path)


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    import errno
    import logging

    from fedlora import checkpoint as ckpt

    keeper = ckpt.Checkpointer(tmp_path, 1)
    keeper.after_round(1, lambda: Checkpoint(round=1, arrays={"w": np.ones(3, np.float32)}), 1.0, last=False)
    real = ckpt._replace_atomically

    def full_disk(path, write):
        if path.suffix == ".safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(ckpt, "_replace_atomically", full_disk)
    with caplog.at_level(logging.ERROR, logger="fedlora"):
        keeper.after_round(2, lambda: Checkpoint(round=2, arrays={"w": np.zeros(3, np.float32)}), 1.0, last=False)
    assert "could not write the checkpoint of round 2" in caplog.text and "after round 1" in caplog.text
    back = read_checkpoint(tmp_path)
    assert back.round == 1 and np.array_equal(back.arrays["w"], np.ones(3, np.float32))  # the last good one


def _stopped_run(tmp_path, overrides, after=2):
    """A run directory as a run of `overrides` stopped after round `after` leaves it."""
    from omegaconf import OmegaConf

    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(resolve(compose(overrides))))
    write_checkpoint(tmp_path, Checkpoint(round=after, arrays={}))


def test_a_resume_may_add_rounds_and_change_how_it_runs_and_nothing_else(tmp_path):
    overrides = SMALL + ["method=fedmud"]
    _stopped_run(tmp_path, overrides)
    again, done = resumed_config(tmp_path, ["resume=" + str(tmp_path), "num_rounds=4", "checkpoint.every=3"])
    assert (again.num_rounds, again.checkpoint.every, again.resume, done) == (4, 3, str(tmp_path.resolve()), 2)
    assert again.method == resolve(compose(overrides)).method
    # the run's own overrides, presets included, may be given again
    assert resumed_config(tmp_path, overrides + ["num_rounds=4"])[0].num_rounds == 4
    with pytest.raises(ConfigError, match=r"may change only num_rounds.*local.lr: 0.01 in the run, 0.5 now"):
        resumed_config(tmp_path, ["num_rounds=4", "local.lr=0.5"])
    with pytest.raises(ConfigError, match=r"method.name: 'fedmud' in the run, 'fedavg' now"):
        resumed_config(tmp_path, ["num_rounds=4", "method=fedavg"])
    for rounds in (1, 2):  # a resume must add rounds
        with pytest.raises(ConfigError, match=f"num_rounds={rounds} adds none: give num_rounds=3 or more"):
            resumed_config(tmp_path, [f"num_rounds={rounds}"])
    with pytest.raises(ConfigError, match="checkpoint.every must be auto or a number"):
        resolve(compose(overrides + ["checkpoint.every=-1"]))


def test_a_run_under_a_dp_budget_resumes_to_its_own_rounds_only(tmp_path):
    """Its σ was found for dp.epsilon over its num_rounds: more rounds would overspend."""
    _stopped_run(tmp_path, SMALL + ["method=fedavg", "dp.where=server", "dp.epsilon=3", "num_rounds=4"], after=1)
    assert resumed_config(tmp_path, [])[0].num_rounds == 4  # an interrupted run goes on to its end
    with pytest.raises(ConfigError, match=r"found for dp.epsilon=3.0 over its num_rounds=4; more rounds would spend"):
        resumed_config(tmp_path, ["num_rounds=6"])


def test_flwr_run_resumes_through_its_run_config(tmp_path):
    """Under `flwr run` a resume is an override in the run config: the ServerApp runs the run's own
    config, and refuses an override that changes it."""
    from strategies.server_app import config_from_run_config

    _stopped_run(tmp_path, SMALL + ["method=fedmud"], after=1)
    cfg = config_from_run_config({"overrides": f"resume='{tmp_path}' num_rounds=3"})
    assert (cfg.method.name, cfg.num_rounds, cfg.resume) == ("fedmud", 3, str(tmp_path))
    with pytest.raises(ConfigError, match="method.compression_ratio"):
        config_from_run_config({"overrides": f"resume='{tmp_path}' num_rounds=3 method.compression_ratio=0.5"})


# --- real runs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedmud_bkd_aad", "ffa_lora-lora", "lora_fair-lora"])
def test_a_run_stopped_after_round_1_and_resumed_writes_what_the_whole_run_wrote(name, preset_run, ray_address,
                                                                                 tmp_path):
    """The full FedMUD method (folded weights, factors redrawn from round seeds), FFA-LoRA and
    LoRA-FAIR: one round, then a resume to two, against the preset's two-round run."""
    _, whole = preset_run(name)
    overrides = PRESETS[name] + [f"simulation.ray_address={ray_address}", "num_rounds=1"]
    run_simulation(resolve(compose(overrides)), tmp_path)
    assert read_checkpoint(tmp_path).round == 1
    run_simulation(resumed_config(tmp_path, ["num_rounds=2"])[0], tmp_path)
    assert measured(metrics_rows(tmp_path)) == measured(metrics_rows(whole))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["resumed"] == [{"after_round": 1, "notes": []}]
    assert read_checkpoint(tmp_path).round == 2  # the last round's, for a resume that adds rounds


def _sim(args, tmp_path, **kw):
    exe = str(Path(sys.executable).with_name("fedlora-sim"))
    end_kept_actors()  # the head's CPUs, which this process's last run left to its next one
    return subprocess.Popen([exe, *args], stdout=open(tmp_path / "log.txt", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=os.environ.copy(), **kw)


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, deadline: float) -> None:
    while not (run_dir / CHECKPOINT_DIR / INDEX).is_file():
        assert proc.poll() is None, (Path(run_dir).parent / "log.txt").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_fedlora_sim_killed_or_terminated_during_round_2_resumes_to_the_same_records(how, preset_run, ray_address,
                                                                                   tmp_path):
    """FedAvg under fedlora-sim: SIGKILL as soon as round 1's checkpoint exists leaves it whole;
    SIGTERM closes the records (status interrupted), exits non-zero and leaves it too. Either way
    `fedlora-sim resume=RUN_DIR` finishes the run with the records of the run never stopped."""
    _, whole = preset_run("fedavg")
    run_dir = tmp_path / "run"
    args = PRESETS["fedavg"] + [f"simulation.ray_address={ray_address}", f"hydra.run.dir={run_dir}"]
    proc = _sim(args, tmp_path)
    _wait_for_checkpoint(run_dir, proc, time.time() + 240)
    os.killpg(proc.pid, how) if how == signal.SIGKILL else proc.send_signal(how)
    code = proc.wait(timeout=120)
    assert code != 0
    if how == signal.SIGTERM:  # records closed before the exit
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert read_checkpoint(run_dir).round >= 1
    resumed = _sim([f"resume={run_dir}", f"simulation.ray_address={ray_address}"], tmp_path,
                   cwd=tmp_path)  # from elsewhere: the run directory is where its records are
    assert resumed.wait(timeout=240) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert measured(metrics_rows(run_dir)) == measured(metrics_rows(whole))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2


def test_a_resumed_broadcast_run_rebuilds_every_replica_from_the_checkpoint(preset_run, ray_address, tmp_path):
    """Under broadcast_update the replicas lived on the nodes: a resumed run sends every client the
    global state once (counted in the next round's bytes, and said in the summary), and goes on to
    the same global model as the run never stopped."""
    cfg, whole = preset_run("fedmud-broadcast")
    overrides = PRESETS["fedmud-broadcast"] + [f"simulation.ray_address={ray_address}", "num_rounds=1"]
    run_simulation(resolve(compose(overrides)), tmp_path)
    run_simulation(resumed_config(tmp_path, ["num_rounds=2"])[0], tmp_path)
    got, want = metrics_rows(tmp_path), metrics_rows(whole)
    assert [r["test_accuracy"] for r in got] == [r["test_accuracy"] for r in want]
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in want], rel=1e-5)
    from conftest import built
    from fedlora.ledger import serialized_bytes
    from fedlora.state import state_tensors

    method, model = built(cfg)
    state = sum(serialized_bytes(t) for t in state_tensors(model, method.global_keys(model)).values())
    assert got[1]["bytes_down"] == want[1]["bytes_down"] + cfg.num_clients * state
    notes = json.loads((tmp_path / "summary.json").read_text())["resumed"][0]["notes"]
    assert notes == [f"the replicas of the global model were rebuilt from the checkpoint on {cfg.num_clients} clients"]
