"""`fedlora-report`: how much accuracy each method/config reaches for how many bytes, over seeds.

It reads run directories (each holds the `config.yaml` and `metrics.jsonl` that a run writes), groups
them by the config keys that differ between them (found automatically; seeds are the replicates), and
writes a table (Markdown and CSV) and plots (PNG and SVG) into a report folder. Only completed runs are
averaged; a run that failed, was interrupted or is still going is shown on its own row, marked.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fedlora.errors import FedloraError
from fedlora.plots import PLOTS, plot_accuracy
from fedlora.records import human_bytes
from fedlora.structured import flatten, matches_any

# Keys that do not make two runs different experiments: the seed is what a group averages over, the
# others say where and how a run was executed, not what it computed.
NOT_GROUPING = ("seed", "verbose", "tensorboard", "data.root", "data.cache_dir", "data.download",
                "eval.batch_size", "simulation.", "resume", "checkpoint.")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "partition.alpha" -> 0.3
    rows: list[dict[str, Any]]  # metrics.jsonl
    summary: dict[str, Any] | None  # summary.json; None while a run goes on (or if it was killed)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def planned(self) -> int:
        return int(self.config.get("num_rounds") or 0)

    @property
    def complete(self) -> bool:
        return bool(self.summary) and self.summary.get("status") == "completed" and len(self.rows) == self.planned

    @property
    def status(self) -> str:
        state = self.summary.get("status", "unknown") if self.summary else "running or killed"
        return "completed" if self.complete else f"{state} after {len(self.rows)}/{self.planned} rounds"

    def accuracies(self) -> list[float]:
        return [math.nan if r["test_accuracy"] is None else r["test_accuracy"] for r in self.rows]

    def first_reaching(self, target: float) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["test_accuracy"] is not None and r["test_accuracy"] >= target), None)

    def wall_seconds(self) -> float:
        if self.summary and self.summary.get("total_seconds") is not None:
            return float(self.summary["total_seconds"])
        return float(sum(r["round_seconds"] for r in self.rows))


@dataclass
class Group:
    label: str
    key: tuple
    values: dict[str, Any]  # grouping key -> value
    runs: list[Run] = field(default_factory=list)  # completed runs only, averaged
    partial: list[Run] = field(default_factory=list)  # never averaged


# ---------------------------------------------------------------- reading runs


def _natural(path: Path) -> list:
    # multirun jobs are numbered 0_, 1_, ..., 10_: sort them as numbers
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise FedloraError(f"{path} does not exist")
        if (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file():
            found.append(path)
            continue
        found += sorted((m.parent for m in path.rglob("metrics.jsonl")
                         if (m.parent / "config.yaml").is_file() and ".hydra" not in m.parts), key=_natural)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise FedloraError(f"no fedlora runs under {', '.join(map(str, paths))}: a run directory holds "
                           "config.yaml and metrics.jsonl (fedlora-sim writes them into outputs/ or multirun/)")
    return unique


def _read_metrics(path: Path, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a run killed while writing its last line
                warn(f"{path}: the last line is cut short; it is left out")
                break
            raise FedloraError(f"{path}, line {i + 1}: not a JSON line; was the file edited?") from None
    missing = {"round", "test_accuracy", "cum_bytes_up", "cum_bytes_down", "round_seconds"} - set(rows[0]) if rows else set()
    if missing:
        raise FedloraError(f"{path}: not a fedlora metrics file (no {', '.join(sorted(missing))})")
    return rows


def load_run(path: Path, warn: Callable[[str], None]) -> Run:
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    except Exception as e:  # noqa: BLE001 -- any unreadable config is the same user-facing problem
        raise FedloraError(f"{path / 'config.yaml'} cannot be read: {e}") from e
    summary_file = path / "summary.json"
    try:
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    except json.JSONDecodeError as e:
        raise FedloraError(f"{summary_file} is not JSON: {e}") from e
    return Run(path, flatten(config), _read_metrics(path / "metrics.jsonl", warn), summary)


# ---------------------------------------------------------------- grouping


def _key_order(key: str) -> tuple:
    # a section's name before its other keys: method.name, method.compression_ratio, partition.name, ...
    section, _, last = key.rpartition(".")
    return (section or key, last != "name", key)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config}, key=_key_order)
    return [k for k in keys
            if not matches_any(k, NOT_GROUPING) and len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def _fmt(v: Any) -> str:
    return "null" if v is None else str(v)


def label_of(values: dict[str, Any]) -> str:
    """`method=fedmud_bkd_aad, method.compression_ratio=0.0625`: a section's name as `section=name`."""
    if not values:
        return "all runs"
    return ", ".join(f"{k[:-5]}={_fmt(v)}" if k.endswith(".name") else f"{k}={_fmt(v)}" for k, v in values.items())


def label_keys(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """The grouping keys worth naming: the `.name` keys, and the others unless the names fix them
    (a method preset's learning rate, a partition's alpha) because they never vary between runs with
    the same names."""
    names = [k for k in keys if k.endswith(".name")]
    shown = []
    for k in keys:
        seen: dict[str, set[str]] = {}
        for r in runs:
            seen.setdefault(json.dumps([r.config.get(n) for n in names]), set()).add(json.dumps(r.config.get(k)))
        if k in names or not names or any(len(v) > 1 for v in seen.values()):
            shown.append(k)
    return shown


def group_runs(runs: Sequence[Run], group_by: Sequence[str] | None = None) -> tuple[list[Group], list[str]]:
    """Groups in the order their first run was found, and the keys they are grouped by."""
    if group_by:
        unknown = [k for k in group_by if all(k not in r.config for r in runs)]
        if unknown:
            raise FedloraError(f"--group-by: no run has the key(s) {', '.join(unknown)}; keys look like "
                               "method.name, partition.alpha, local.lr")
        keys = list(group_by)
    else:
        keys = differing_keys(runs)
    datasets = sorted({str(r.config.get("dataset.name")) for r in runs})
    if len(datasets) > 1 and not (group_by and "dataset.name" in group_by):
        counts = ", ".join(f"{d}: {sum(str(r.config.get('dataset.name')) == d for r in runs)} runs" for d in datasets)
        raise FedloraError(f"these runs use different datasets ({counts}); their accuracies are not comparable: "
                           "report each dataset's runs separately, or pass --group-by with dataset.name among "
                           "the keys to put them in one table anyway")
    shown = label_keys(runs, keys)
    groups: dict[tuple, Group] = {}
    for run in runs:
        values = {k: run.config.get(k) for k in keys}
        key = tuple(json.dumps(v) for v in values.values())
        group = groups.setdefault(key, Group(label_of({k: values[k] for k in shown}), key, values))
        (group.runs if run.complete else group.partial).append(run)
    return list(groups.values()), keys


# ---------------------------------------------------------------- statistics


@dataclass
class Stat:
    mean: float | None
    std: float | None  # sample standard deviation; None for a single value
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        vals = [v for v in values if v is not None and not math.isnan(v)]
        if not vals:
            return cls(None, None, 0)
        return cls(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))

    def text(self, fmt: Callable[[float], str]) -> str:
        if self.mean is None:
            return "n/a"
        if self.std is None or self.std == 0:
            return fmt(self.mean)
        return f"{fmt(self.mean)} ± {fmt(self.std)}"


def _number(x: float | None) -> Any:
    if x is None:
        return ""
    return int(x) if float(x).is_integer() else x


def _acc(x: float) -> str:
    return f"{x:.4f}"


def _rounds(x: float) -> str:
    return f"{x:.1f}" if x % 1 else f"{x:.0f}"


def _secs(x: float) -> str:
    return f"{x:.0f} s" if x < 600 else f"{x / 60:.1f} min"


def row_stats(runs: Sequence[Run], target: float | None) -> dict[str, Any]:
    s: dict[str, Any] = {
        "final_accuracy": Stat.of([r.accuracies()[-1] if r.rows else None for r in runs]),
        "best_accuracy": Stat.of([max((a for a in r.accuracies() if not math.isnan(a)), default=None) for r in runs]),
        "bytes_up": Stat.of([r.rows[-1]["cum_bytes_up"] if r.rows else None for r in runs]),
        "bytes_down": Stat.of([r.rows[-1]["cum_bytes_down"] if r.rows else None for r in runs]),
        "wall_seconds": Stat.of([r.wall_seconds() for r in runs]),
        # eval.clients: the clients' own held-out accuracy in the last round, mean over clients and the worst
        "client_accuracy_mean": Stat.of([r.rows[-1].get("client_accuracy_mean") if r.rows else None for r in runs]),
        "client_accuracy_worst": Stat.of([r.rows[-1].get("client_accuracy_worst") if r.rows else None for r in runs]),
    }
    if target is not None:
        hits = [r.first_reaching(target) for r in runs]
        reached = [h for h in hits if h is not None]
        s["reached"] = len(reached)
        if len(reached) == len(runs):
            s["bytes_up_to_target"] = Stat.of([h["cum_bytes_up"] for h in reached])
            s["rounds_to_target"] = Stat.of([h["round"] for h in reached])
    return s


# ---------------------------------------------------------------- the report


@dataclass
class TableRow:
    label: str
    values: dict[str, Any]
    status: str
    runs: list[Run]
    stats: dict[str, Any]


def table_rows(groups: Sequence[Group], target: float | None) -> list[TableRow]:
    rows = []
    for g in groups:
        if g.runs:
            rows.append(TableRow(g.label, g.values, "completed", g.runs, row_stats(g.runs, target)))
        for run in g.partial:
            rows.append(TableRow(g.label, g.values, run.status, [run], row_stats([run], target)))
    return rows


def _seeds(runs: Sequence[Run]) -> str:
    return ", ".join(_fmt(r.seed) for r in runs)


def _target_cells(row: TableRow, target: float | None) -> list[str]:
    if target is None:
        return []
    n, reached = len(row.runs), row.stats["reached"]
    if reached == n:
        return [row.stats["bytes_up_to_target"].text(human_bytes), row.stats["rounds_to_target"].text(_rounds)]
    missed = "not reached" if reached == 0 else f"not reached by {n - reached} of {n} runs"
    return [missed, missed]


CLIENT_MEASURES = ("client_accuracy_mean", "client_accuracy_worst")


def _has_client_scores(rows: Sequence[TableRow]) -> bool:
    return any(r.stats["client_accuracy_mean"].n for r in rows)


def markdown_table(rows: Sequence[TableRow], target: float | None) -> str:
    head = ["config", "status", "seeds", "rounds", "final accuracy", "best accuracy", "uplink total", "downlink total"]
    if target is not None:
        head += [f"uplink to {target:g}", f"rounds to {target:g}"]
    clients = _has_client_scores(rows)
    if clients:
        head += ["clients' accuracy (mean)", "worst client"]
    head.append("wall time")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, r.status if r.status == "completed" else f"**{r.status}**", _seeds(r.runs),
                 str(len(r.runs[0].rows)) if r.status == "completed" else f"{len(r.runs[0].rows)}/{r.runs[0].planned}",
                 r.stats["final_accuracy"].text(_acc), r.stats["best_accuracy"].text(_acc),
                 r.stats["bytes_up"].text(human_bytes), r.stats["bytes_down"].text(human_bytes),
                 *_target_cells(r, target),
                 *([r.stats[m].text(_acc) for m in CLIENT_MEASURES] if clients else []),
                 r.stats["wall_seconds"].text(_secs)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[TableRow], keys: Sequence[str], target: float | None) -> None:
    measures = ["final_accuracy", "best_accuracy", "bytes_up", "bytes_down", "wall_seconds"]
    if target is not None:
        measures[4:4] = ["bytes_up_to_target", "rounds_to_target"]
    if _has_client_scores(rows):
        measures[-1:-1] = list(CLIENT_MEASURES)
    head = ["config", *keys, "status", "runs", "seeds", "rounds"]
    for m in measures:
        head += [f"{m}_mean", f"{m}_std"]
    if target is not None:
        head += ["target_accuracy", "runs_reaching_target"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            line = [r.label, *("" if r.values.get(k) is None else r.values[k] for k in keys), r.status, len(r.runs),
                    " ".join(_fmt(run.seed) for run in r.runs), len(r.runs[0].rows)]
            for m in measures:
                st = r.stats.get(m) or Stat(None, None, 0)
                line += [_number(st.mean), _number(st.std)]
            if target is not None:
                line += [target, r.stats["reached"]]
            w.writerow(line)


def caption(runs: Sequence[Run], groups: Sequence[Group]) -> str:
    """What every line of a plot shares: dataset, clients, rounds, seeds."""

    def common(key: str) -> Any:
        values = {json.dumps(r.config.get(key)) for r in runs}
        return runs[0].config.get(key) if len(values) == 1 else None

    parts = [str(common("dataset.name") or "mixed datasets")]
    if common("num_clients") is not None:
        parts.append(f"{common('num_clients')} clients, {common('clients_per_round') or 'varying'} per round")
    rounds = sorted({r.planned for r in runs})
    parts.append(f"{rounds[0]} rounds" if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]} rounds")
    seeds = sorted({r.seed for r in runs}, key=lambda s: (str(type(s)), s))
    parts.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(_fmt, seeds))}")
    if len(groups) > 1 and any(len(g.runs) > 1 for g in groups):
        parts.append("mean ± std over seeds")
    return " · ".join(parts)


def make_report(paths: Sequence[str | Path], out: str | Path | None = None, target: float | None = None,
                group_by: Sequence[str] | None = None,
                warn: Callable[[str], None] | None = None) -> tuple[Path, str]:
    """Write table.md, table.csv and the plots; return the report folder and the Markdown table."""
    warn = warn or (lambda msg: print(f"fedlora-report: {msg}", file=sys.stderr))
    if target is not None and not 0 < target <= 1:
        raise FedloraError(f"--target-accuracy must be in (0, 1] (got {target})")
    runs = [load_run(p, warn) for p in find_run_dirs(paths)]
    groups, keys = group_runs(runs, group_by)
    for g in groups:
        seeds = [r.seed for r in g.runs]
        if len(set(map(json.dumps, seeds))) < len(seeds):
            warn(f"{g.label}: several completed runs share a seed ({_seeds(g.runs)}); each counts once")
        for run in g.partial:
            warn(f"{run.path}: {run.status}; shown on its own row, not averaged")
    if not any(g.runs for g in groups):
        warn("no run has completed: every row shows a single partial run")
    if out is None:
        bases = [Path(p).resolve() for p in paths]
        out = (bases[0] if len(bases) == 1 else Path(os.path.commonpath(bases))) / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(groups, target)
    title = caption(runs, groups)
    note = ("Mean ± sample standard deviation over the completed runs of each config; a run that did not "
            "complete is shown on its own row. Bytes are the serialized arrays of every message, from each "
            "run's metrics.jsonl.")
    table = markdown_table(rows, target)
    (out / "table.md").write_text(
        f"# fedlora report\n\n{title}\n\nGrouped by: {', '.join(keys) or 'nothing (one config)'}\n\n{table}\n"
        f"{note}\n\nRuns:\n\n" + "".join(f"- `{r.path}`: {r.status}\n" for r in runs))
    write_csv(out / "table.csv", rows, keys, target)
    plot_accuracy(groups, out, title, target)
    return out, table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedlora-report",
        description="Tables and plots of accuracy against communicated bytes, over the run directories "
                    "of fedlora-sim (single runs or whole multirun folders).")
    parser.add_argument("paths", nargs="+", help="run directories, or folders searched for them (a multirun folder)")
    parser.add_argument("--target-accuracy", type=float, default=None, metavar="A",
                        help="also report the uplink bytes and rounds each config needs to reach test accuracy A")
    parser.add_argument("--group-by", default=None, metavar="KEYS",
                        help="comma-separated config keys to group by (default: every key that differs "
                             "between the runs, except the seed and where they ran)")
    parser.add_argument("-o", "--out", default=None,
                        help="report folder (default: report/ in the given folder, or in the given folders' common parent)")
    args = parser.parse_args(argv)
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else None
    try:
        out, table = make_report(args.paths, args.out, args.target_accuracy, group_by)
    except FedloraError as e:
        print(f"fedlora-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table)
    print("wrote table.md, table.csv, " + ", ".join(f"{p}.{{png,svg}}" for p in PLOTS) + " to")
    print(out)
