"""Flower's processes on this machine, for the deployment tests and `benchmarks/deploy_round.py`: a
free port, the processes started (each in a session of its own, logging to a file, stopped by its
whole process group, so that the apps Flower spawns go with it), and bounded waits for a port to
listen and for SuperNodes to come online."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The processes started, from this environment's bin/, in `logs` (their working folder, and
    NAME.log for each); stop() ends each one's process group: SIGTERM, at most 20 s, then SIGKILL."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.started = env, logs, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env, cwd=self.logs, start_new_session=True)
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def run(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=self.env,
                              cwd=self.logs, timeout=timeout)

    def stop(self, procs: list[subprocess.Popen] | None = None) -> None:
        """Stop `procs` (by default all those started) and their process groups."""
        procs = self.started if procs is None else procs
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        for proc in procs:  # the children of a leader that exited on its own
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def nodes(procs: Processes, connection: str) -> list[dict]:
    """The SuperNodes the SuperLink of `connection` knows, as `flwr supernode ls` lists them."""
    out = procs.run("flwr", "supernode", "ls", connection, "--format", "json", timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"flwr supernode ls {connection} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout)["nodes"]


def wait_online(procs: Processes, connection: str, until: Callable[[list[dict]], bool], log: str,
                timeout: float = 60) -> None:
    """Wait until `until(the nodes online)` holds; past `timeout`, fail with the end of `log`'s log."""
    deadline = time.time() + timeout
    while True:
        try:
            if until([n for n in nodes(procs, connection) if n["status"] == "online"]):
                return
        except RuntimeError:
            pass  # the SuperLink is not answering yet
        if time.time() > deadline:
            raise RuntimeError(f"the SuperNodes are not as awaited after {timeout} s; {log}.log ends:\n"
                               + procs.log(log)[-2000:])
        time.sleep(1)
