"""A run's records: resolved config, per-client class histogram, one JSON line per round, a summary,
and TensorBoard event files when tensorboard is installed.

Every line is flushed as it is written, and the summary is written on failure too (with its status),
so an interrupted run keeps everything it measured.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from fedlora.ledger import Ledger

log = logging.getLogger("fedlora")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if abs(n) < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def without_times(row: dict[str, Any]) -> dict[str, Any]:
    """A round's figures but its wall-clock times (the `*_seconds` keys): what a rerun of the same
    seeded run reproduces."""
    return {k: v for k, v in row.items() if not k.endswith("_seconds")}


def _finite_or_none(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN: a value that could not be measured (no valid reply this round) is null.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


class RunRecorder:
    """The records of one run; `ledger` counts the bytes of every message the run sends and receives."""

    def __init__(self, run_dir: str | Path, cfg: DictConfig, ledger: Ledger):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.ledger = ledger
        self.rounds: list[dict[str, Any]] = []
        self.initial: dict[str, float] = {}
        self.extra: dict[str, Any] = {}  # method facts for the summary, such as the compression achieved
        self.started = time.time()
        (self.dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        self._metrics = open(self.dir / "metrics.jsonl", "w")
        self._board = self._tensorboard_writer(cfg)

    def resume_from(self, checkpoint) -> None:
        """Go on from a checkpoint's records (`fedlora.checkpoint.Checkpoint`): its rows are metrics.jsonl's
        again (a row written after the checkpoint, by a run killed before the next one, is dropped),
        and the ledger's totals and the run time go on from its."""
        self.initial, self.extra = dict(checkpoint.initial), dict(checkpoint.extra)
        self.ledger.total_up, self.ledger.total_down = checkpoint.total_up, checkpoint.total_down
        self.started = time.time() - checkpoint.seconds
        for row in checkpoint.rounds:
            self.rounds.append(row)
            self._metrics.write(json.dumps(_finite_or_none(row)) + "\n")
        self._metrics.flush()

    def _tensorboard_writer(self, cfg: DictConfig):
        from fedlora.config import tensorboard_available

        if cfg.tensorboard is False or (cfg.tensorboard == "auto" and not tensorboard_available()):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.dir), max_queue=1000, flush_secs=3600)

    def record_initial(self, accuracy: float, loss: float) -> None:
        self.initial = {"test_accuracy": accuracy, "test_loss": loss}
        if self._board:
            self._board.add_scalar("test/accuracy", accuracy, 0)
            self._board.add_scalar("test/loss", loss, 0)
            self._board.flush()

    def write_partitions(self, histogram: list[list[int]], own_examples: dict[int, int] | None = None) -> None:
        """The class counts of each client's partition; a deployed node with its own data (own_examples:
        partition id -> its number of examples) has its size and no class counts."""
        own = own_examples or {}
        counts = [None if i in own else h for i, h in enumerate(histogram)]
        data = {"num_clients": len(histogram), "partition": OmegaConf.to_container(self.cfg.partition),
                "seed": self.cfg.seed, "class_counts": counts,
                "sizes": [own[i] if i in own else sum(h) for i, h in enumerate(histogram)],
                "own_data": sorted(own)}
        (self.dir / "partitions.json").write_text(json.dumps(data))

    def record_round(self, row: dict[str, Any]) -> None:
        self.rounds.append(row)
        self._metrics.write(json.dumps(_finite_or_none(row)) + "\n")
        self._metrics.flush()
        if self._board:
            self._write_board(row)
        log.info(
            "round %d/%d | acc %.4f | loss %.4f | train loss %.4f | clients %d | up %s | down %s | total up %s | %.1f s",
            row["round"], self.cfg.num_rounds, row["test_accuracy"], row["test_loss"], row["train_loss"],
            row["num_clients"], human_bytes(row["bytes_up"]), human_bytes(row["bytes_down"]),
            human_bytes(row["cum_bytes_up"]), row["round_seconds"],
        )
        if row.get("failed") or row.get("timed_out"):
            log.info("round %d/%d | %d clients failed, %d did not answer in time", row["round"], self.cfg.num_rounds,
                     row["failed"], row["timed_out"])
        if "client_accuracy_mean" in row:
            log.info("round %d/%d | clients' own held-out data: acc mean %.4f | worst %.4f | spread %.4f | %d clients",
                     row["round"], self.cfg.num_rounds, row["client_accuracy_mean"], row["client_accuracy_worst"],
                     row["client_accuracy_std"], row["clients_evaluated"])

    def _write_board(self, row: dict[str, Any]) -> None:
        step = row["round"]
        for key, tag in (("test_accuracy", "test/accuracy"), ("test_loss", "test/loss"), ("train_loss", "train/loss"),
                         ("bytes_up", "bytes/up"), ("bytes_down", "bytes/down"), ("cum_bytes_up", "bytes/cum_up"),
                         ("cum_bytes_down", "bytes/cum_down"), ("round_seconds", "time/round_seconds"),
                         ("client_accuracy_mean", "clients/accuracy_mean"), ("client_accuracy_worst", "clients/accuracy_worst"),
                         ("client_accuracy_std", "clients/accuracy_std")):
            if row.get(key) is not None:
                self._board.add_scalar(tag, row[key], step)
        # TensorBoard's steps are integers: accuracy against the uplink kB sent so far
        self._board.add_scalar("test/accuracy_vs_uplink_kB", row["test_accuracy"], row["cum_bytes_up"] // 1000)
        self._board.flush()

    def checkpoint(self, server_round: int, arrays) -> Callable[[], Any]:
        """The checkpoint after `server_round` (`fedlora.checkpoint`), built when called: the global
        arrays, and the ledger's totals and the records as they are now, as `server_round` ends (a
        checkpoint that is not due yet is written later, when the next round may have changed them)."""
        from fedlora.checkpoint import Checkpoint

        now = dict(round=server_round, total_up=self.ledger.total_up, total_down=self.ledger.total_down,
                   seconds=round(time.time() - self.started, 3), initial=dict(self.initial), rounds=list(self.rounds),
                   extra=copy.deepcopy(self.extra))
        return lambda: Checkpoint(arrays={k: a.numpy() for k, a in arrays.items()}, **now)

    def summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        finite = [r for r in self.rounds if math.isfinite(r["test_accuracy"])]
        best = max(finite, key=lambda r: r["test_accuracy"], default={})
        last = self.rounds[-1] if self.rounds else {}
        data = {
            "status": status,
            "method": self.cfg.method.name,
            "dataset": self.cfg.dataset.name,
            "model": self.cfg.model.name,
            "seed": self.cfg.seed,
            "rounds_completed": len(self.rounds),
            "rounds_planned": self.cfg.num_rounds,
            "initial_accuracy": self.initial.get("test_accuracy"),
            "final_accuracy": last.get("test_accuracy"),
            "best_accuracy": best.get("test_accuracy"),
            "best_round": best.get("round"),
            # every message sent or received, the interrupted round's too
            "total_bytes_up": self.ledger.total_up,
            "total_bytes_down": self.ledger.total_down,
            "total_seconds": round(time.time() - self.started, 3),
            **self.extra,
        }
        if error:
            data["error"] = error
        return data

    def close(self, status: str, error: str | None = None) -> dict[str, Any]:
        self._metrics.close()
        if self._board:
            self._board.close()
        data = self.summary(status, error)
        (self.dir / "summary.json").write_text(json.dumps(_finite_or_none(data), indent=1))
        return data


def setup_logging(verbose: bool = False, stream=None) -> None:
    """fedlora's round lines on stdout (or `stream`: a benchmark that prints its JSON on stdout sends
    them to stderr), set where the process first calls this; Flower's own INFO logs only when verbose."""
    import sys

    if not log.handlers:
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s fedlora | %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
