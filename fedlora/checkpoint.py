"""Checkpoints of a run, and resuming from the last one.

After a round (every `checkpoint.every` rounds; `auto`: every round, spaced out only where writing
one would take more than a twentieth of the rounds' time) the ServerApp writes into RUN_DIR/checkpoint/:

- `state-ROUND.safetensors`: the global state after that round (the method's `global_keys`: what
  trains, and the frozen weights where the method folds updates into them);
- `checkpoint.json`: the round, the ledger's totals, the run time so far, and the records so far
  (the initial evaluation, every round's row, the method's facts for the summary).

Each file is written under a temporary name and renamed, the JSON last, so that a kill at any
instant leaves the previous checkpoint whole. Nothing else needs saving: the clients sampled in a
round and every client's training seed derive from the run seed and the round (`strategies.strategy.sample`,
`seeds.derive_seed`), and so do the factors a method redraws.

`fedlora-sim resume=RUN_DIR` (or `flwr run` with `resume=RUN_DIR` in its overrides) runs the run's own
config (its `config.yaml`) with the overrides given beside `resume` on top (they may repeat the run's
own, presets included); one that changes anything but the number of rounds (which must grow) and how
and where it runs (`MAY_DIFFER`) is refused, naming the keys.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedlora.errors import ConfigError
from fedlora.structured import flatten, matches_any

log = logging.getLogger("fedlora")

CHECKPOINT_DIR = "checkpoint"
INDEX = "checkpoint.json"
# what a resume may change: the number of rounds (which must grow), and how and where the run runs,
# which changes none of its figures (a section ends in ".")
MAY_DIFFER = ("num_rounds", "resume", "checkpoint.", "verbose", "tensorboard", "simulation.", "data.root",
              "data.cache_dir", "eval.batch_size",
              "model.gradient_checkpointing")  # the same results, with less memory


@dataclass
class Checkpoint:
    """What a run needs to go on after `round`."""

    round: int
    arrays: dict[str, np.ndarray]
    total_up: int = 0
    total_down: int = 0
    seconds: float = 0.0
    initial: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _replace_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(run_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` into RUN_DIR/checkpoint/ (the state, then the index that names it), and
    remove the states that no index names any more."""
    from safetensors.numpy import save

    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / f"state-{checkpoint.round:05d}.safetensors"
    arrays = {k: np.ascontiguousarray(v) for k, v in checkpoint.arrays.items()}
    _replace_atomically(state, lambda f: f.write(save(arrays)))
    index = {k: v for k, v in asdict(checkpoint).items() if k != "arrays"} | {"state": state.name}
    _replace_atomically(folder / INDEX, lambda f: f.write(json.dumps(index, allow_nan=True).encode()))
    fd = os.open(folder, os.O_RDONLY)  # the renames on disk before the state they replace goes
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in [*folder.glob("state-*.safetensors"), *folder.glob(".*.tmp")]:
        if old != state:
            old.unlink(missing_ok=True)
    return folder / INDEX


def read_checkpoint(run_dir: str | Path, arrays: bool = True) -> Checkpoint:
    """The last checkpoint in RUN_DIR (without its arrays unless `arrays`); ConfigError when there is
    none or it is damaged."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(run_dir) / CHECKPOINT_DIR
    if not has_checkpoint(run_dir):
        raise ConfigError(f"resume={run_dir}: no checkpoint there ({folder / INDEX} is missing): the run stopped "
                          "before its first checkpoint, or is not a fedlora run directory; start it again instead")
    try:
        index = json.loads((folder / INDEX).read_text())
        state = folder / index.pop("state")
        loaded = load_file(str(state)) if arrays else {}
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ConfigError(f"resume={run_dir}: its checkpoint is damaged ({type(e).__name__}: {e})") from e
    return Checkpoint(arrays=loaded, **index)


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / INDEX).is_file()


def _config_groups() -> set[str]:
    """The config groups of conf/ (dataset=..., method=...), and experiment."""
    from importlib.resources import files

    return {p.name for p in files("conf").iterdir() if p.is_dir() and not p.name.startswith("_")} | {"experiment"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resumed_config(run_dir: str | Path, given: list[str]) -> tuple[DictConfig, int]:
    """The config to resume RUN_DIR with (the run's own, with the `given` overrides on top, `resume`
    among them ignored) and the round its last checkpoint follows; ConfigError where the overrides
    change what a resume may not, or add no round."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from fedlora.config import resolve

    run_dir = Path(run_dir).resolve()
    done = read_checkpoint(run_dir, arrays=False).round
    saved = OmegaConf.load(run_dir / "config.yaml")
    cfg = OmegaConf.create(OmegaConf.to_container(saved))
    try:
        parsed = OverridesParser.create().parse_overrides([o for o in given if not o.lstrip("+~").startswith("resume=")])
    except HydraException as e:
        raise ConfigError(f"resume={run_dir}: {e}") from e
    for override in parsed:
        key, value = override.key_or_group, override.value()
        if override.is_delete():
            raise ConfigError(f"resume={run_dir}: {override.input_line} would remove a setting of the run")
        if key in _config_groups():  # a preset: the run's own, repeated (or another, refused below)
            chosen = saved.get(key)
            if key in ("experiment", "simulation") or (chosen is None and value in (None, "null")) or (
                    isinstance(chosen, DictConfig) and chosen.get("name") == value):
                continue  # its values are the run's already (an experiment's sweep has set them)
            value = {"name": value}
        OmegaConf.update(cfg, key, value, force_add=True, merge=False)
    was, now = flatten(OmegaConf.to_container(saved)), flatten(OmegaConf.to_container(cfg))
    differ = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k) and not matches_any(k, MAY_DIFFER))
    if differ:
        shown = "; ".join(f"{k}: {_short(was.get(k))} in the run, {_short(now.get(k))} now" for k in differ[:6])
        more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
        raise ConfigError(f"resume={run_dir}: a resume runs the run's own config, and may change only num_rounds and "
                          f"how and where it runs ({', '.join(m.rstrip('.') for m in MAY_DIFFER[2:])}): {shown}{more}")
    if cfg.num_rounds <= done:
        raise ConfigError(f"resume={run_dir}: the run has completed {done} rounds, and num_rounds="
                          f"{cfg.num_rounds} adds none: give num_rounds={done + 1} or more")
    if cfg.dp.get("epsilon") is not None and cfg.num_rounds != saved.num_rounds:
        raise ConfigError(f"resume={run_dir}: the run's DP noise was found for dp.epsilon={cfg.dp.epsilon} over its "
                          f"num_rounds={saved.num_rounds}; more rounds would spend more than that. Resume with "
                          f"num_rounds={saved.num_rounds}, or start a run with the budget and rounds wanted")
    cfg.resume = str(run_dir)
    return resolve(cfg), done


class Checkpointer:
    """When to write a checkpoint, and the writing: after round k when due (`every` rounds, or
    `auto`), and on demand for the last completed round (an interrupted run)."""

    def __init__(self, run_dir: str | Path, every: int | str, written: int = 0):
        self.dir, self.every = Path(run_dir), every
        self.pending = None  # a callable giving the last completed round's Checkpoint, until it is written
        self.pending_round = 0
        self.written = written  # the round of the last checkpoint written
        self._spacing = 1  # auto: rounds between checkpoints

    def after_round(self, server_round: int, checkpoint, round_seconds: float, last: bool) -> None:
        """Keep round `server_round`'s checkpoint (`checkpoint()` builds it), and write it when due
        (always after the last round)."""
        self.pending, self.pending_round = checkpoint, server_round
        every = self._spacing if self.every == "auto" else int(self.every)
        if every < 1 or not (last or server_round - self.written >= every):
            return
        try:
            took = self.flush()
        except OSError as e:  # a full disk, say: the run and its records matter more than a checkpoint
            log.error("could not write the checkpoint of round %d (%s): the run goes on, and a resume would start "
                      "after round %d", server_round, e, self.written)
            return
        if self.every == "auto" and round_seconds > 0:  # writing costs at most a twentieth of the rounds' time
            self._spacing = max(1, int(np.ceil(took / (0.05 * round_seconds))))

    def flush(self) -> float:
        """Write the pending checkpoint, if it is not written yet; the seconds it took."""
        if self.pending is None or self.pending_round == self.written or self.every == 0:
            return 0.0
        started = time.time()
        write_checkpoint(self.dir, self.pending())
        self.written = self.pending_round
        return time.time() - started
