"""Behaviour kept: a short seeded run of every method preset reproduces the per-round records in
tests/golden/metrics.json (those of the presets that existed then were recorded before the method
registry replaced the strategy flags; FlexLoRA's, the first method added with the registry, after).

Bytes each way, clients and rejections are compared exactly everywhere. Accuracies and losses are
compared exactly on a CPU of the kind the records were made on (the same model and instruction set:
another one rounds floating-point sums differently), and to a small tolerance on any other. A kind of
CPU on which that tolerance is not enough (an Intel Xeon, where FedMUD's Kronecker runs part from the
AMD EPYC's records by 3 points in round 2) has records of its own beside the first, made by the same
code (tests/golden/metrics-MACHINE.json); its runs are then compared exactly too. A machine without a
file of its own takes those of a CPU of its vendor, family and model, if one has a file, to the tolerance.

A run of the first file recorded on a machine other than that file's says so (its "machine"): it is
compared exactly on that kind of CPU only. That is how a change of floating-point rounding is recorded
(a run of the same seeds whose sums are taken in another order): the run is recorded anew on one
machine, put into the first file with that machine, and taken out of the other machines' files.

Record anew (only when a change of behaviour is intended, or for a new preset, and say so in the
commit: into this machine's file); the runs selected are recorded, the others kept:
    FEDLORA_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py -k flexlora
A machine's own file is made of every preset (all of this file's tests), by the code that made the
first file's records (a checkout of it), so that it records the same behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest

from conftest import PRESETS, metrics_rows
from fedlora.records import without_times

GOLDEN = Path(__file__).parent / "golden" / "metrics.json"
EXACT = ("round", "num_clients", "rejected", "failed", "timed_out", "bytes_up", "bytes_down", "cum_bytes_up", "cum_bytes_down")
MEASURED = ("test_accuracy", "test_loss", "train_loss")
CLIENTS = ("client_accuracy_mean", "client_accuracy_worst", "client_accuracy_std", "client_loss_mean")  # eval.clients


def machine() -> dict:
    """What decides floating-point results on CPU: the CPU's model and instruction set, torch's version."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "model name", "cpu family", "model", "stepping", "flags") and key not in info:
                info[key] = value.strip()
    except OSError:
        info["processor"] = platform.processor()
    import torch

    flags = info.pop("flags", "")
    return {"cpu": info, "flags_sha": hashlib.sha256(flags.encode()).hexdigest()[:16], "torch": torch.__version__}


def machine_file() -> Path:
    """The records of this machine: the first file's, where it was recorded on this kind of CPU,
    else one of its own beside it (named after the machine), if one was recorded."""
    primary = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if primary.get("machine", machine()) == machine():
        return GOLDEN
    key = hashlib.sha256(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:12]
    return GOLDEN.with_name(f"metrics-{key}.json")


def kin_runs() -> dict:
    """The runs of a file made on a CPU of this one's vendor, family and model under the same torch, where
    this machine has none of its own: it differs only in stepping or in flags that need not change the
    rounding (an Intel Xeon model 167 of stepping 8 reproduced stepping 1's records exactly). They are
    compared to the tolerance, not exactly."""
    me = machine()
    same = ("vendor_id", "cpu family", "model")
    for path in sorted(GOLDEN.parent.glob("metrics-*.json")):
        other = json.loads(path.read_text())["machine"]
        if other["torch"] == me["torch"] and all(other["cpu"].get(k) == me["cpu"].get(k) for k in same):
            return json.loads(path.read_text())["runs"]
    return {}


@pytest.fixture(scope="module")
def golden():
    """The records to compare with, and the presets whose records were made on this kind of machine."""
    own = machine_file()
    if os.environ.get("FEDLORA_RECORD_GOLDEN"):  # into this machine's file
        recorded = json.loads(own.read_text()) if own.is_file() else {"runs": {}}
        recorded["machine"] = machine()
        yield recorded, set()
        GOLDEN.parent.mkdir(exist_ok=True)
        own.write_text(json.dumps(recorded, indent=1) + "\n")
    else:  # a run missing from this machine's own file (a preset recorded elsewhere only): the first file's
        primary = json.loads(GOLDEN.read_text())
        mine = json.loads(own.read_text()) if own != GOLDEN and own.is_file() else {"runs": {}}
        kin = kin_runs() if own != GOLDEN and not own.is_file() else {}
        runs = primary["runs"] | kin | mine["runs"]
        # a run made on this kind of machine: one of its own file's, or of the first file's made here
        # (a run of the first file says where it was made when that was not the file's machine)
        here = set(mine["runs"]) | {name for name, run in primary["runs"].items()
                                    if run.get("machine", primary["machine"]) == machine()}
        yield {"machine": primary["machine"], "runs": runs}, here


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_reproduces_its_golden_records(name, golden, preset_run):
    golden, here = golden
    same_machine = name in here
    _, run_dir = preset_run(name)
    got = [without_times(r) for r in metrics_rows(run_dir)]
    if os.environ.get("FEDLORA_RECORD_GOLDEN"):
        golden["runs"][name] = {"overrides": PRESETS[name], "rows": got}
        return
    assert golden["runs"][name]["overrides"] == PRESETS[name]
    want = golden["runs"][name]["rows"]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: g[k] for k in EXACT} == {k: w[k] for k in EXACT}
        assert set(g) == set(w)  # the same columns: client evaluation where it was
        for key in MEASURED + tuple(k for k in CLIENTS if k in w):
            if same_machine or g[key] is None or w[key] is None:
                assert g[key] == w[key], (key, g["round"])
            else:  # another CPU: the same run up to floating-point rounding
                assert g[key] == pytest.approx(w[key], rel=0.03, abs=0.02), (
                    f"{key} of round {g['round']}: {g[key]} here, {w[key]} recorded on another kind of CPU; where only "
                    f"the rounding differs, record this machine's own: FEDLORA_RECORD_GOLDEN=1 python -m pytest "
                    f"tests/test_golden.py (into {machine_file().name})")
