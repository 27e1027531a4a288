"""The report's plots: test accuracy against cumulative uplink bytes (log x) and against rounds, one line
per config (the mean over its completed runs, with a band of ± one standard deviation), a dashed line per
run that did not complete."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

PLOTS = ("accuracy_vs_uplink", "accuracy_vs_downlink", "accuracy_vs_rounds")


def byte_tick(n: float, _pos=None) -> str:
    """Axis tick text in decimal units: 500 kB, 2 MB, 1.5 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _curve(runs, x_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds the runs share, aligned by round: x (mean over runs), mean accuracy, its std."""
    n = min(len(r.rows) for r in runs)
    acc = np.array([r.accuracies()[:n] for r in runs], dtype=float)
    x = np.array([[row[x_key] for row in r.rows[:n]] for r in runs], dtype=float).mean(axis=0)
    std = acc.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(n)
    return x, acc.mean(axis=0), std


def plot_accuracy(groups: Sequence, out: Path, title: str, target: float | None) -> list[Path]:
    """One figure per name of PLOTS from the report's groups (`report.Group`: a label and its runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, x_key, xlabel in (
        ("accuracy_vs_uplink", "cum_bytes_up", "cumulative uplink (all clients, log scale)"),
        ("accuracy_vs_downlink", "cum_bytes_down", "cumulative downlink (all clients, log scale)"),
        ("accuracy_vs_rounds", "round", "round"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        lo, hi = math.inf, 0.0
        for i, g in enumerate(groups):
            # past the palette's colours, the same colours again with another marker and line
            color, again = colors[i % len(colors)], i // len(colors) % 2
            if g.runs:
                x, mean, std = _curve(g.runs, x_key)
                seeds = f"{len(g.runs)} seed{'s' if len(g.runs) > 1 else ''}"
                ax.plot(x, mean, color=color, marker="s" if again else "o", markersize=3,
                        linestyle="-." if again else "-", label=f"{g.label} ({seeds})")
                if len(g.runs) > 1:
                    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
                lo, hi = min(lo, x.min()), max(hi, x.max())
            for run in g.partial:
                if not run.rows:
                    continue
                x, acc, _ = _curve([run], x_key)
                ax.plot(x, acc, color=color, linestyle="--", linewidth=1,
                        label=f"{g.label} (seed {run.seed}, {run.status})")
                lo, hi = min(lo, x.min()), max(hi, x.max())
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
        if x_key.startswith("cum_bytes"):
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(byte_tick))
            # within two decades, label 2x and 5x too, so the axis has more than one number
            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            few = hi > 0 and lo < math.inf and math.log10(hi / max(lo, 1)) < 2
            ax.xaxis.set_minor_formatter(FuncFormatter(byte_tick) if few else NullFormatter())
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=110, metadata={"Date": None} if ext == "svg" else None)
            written.append(path)
        plt.close(fig)
    return written
