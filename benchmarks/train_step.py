"""A client's training step in PyTorch's default layout against channels last, side by side.

`fedlora.training.train_local` runs a model of images on a CPU with channels last (oneDNN's layout for
convolutions, batch norms and poolings). For each preset below, the method's model as a run builds it,
a batch of the first client's real data, and the run's optimiser, on one thread (a Ray client's
share): blocks of `--steps` steps in each layout in turn, `--blocks` times; the median block of each,
and their ratio. The two layouts' losses agree up to floating-point rounding (printed too).

    python benchmarks/train_step.py
    python benchmarks/train_step.py --only fmnist-fedavg

Prints JSON: per preset, the milliseconds per step in each layout, the ratio (default / channels
last: how many times faster), and the largest difference of the two layouts' losses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {f"{data}-{m}": [f"dataset={data}", f"method={m}", "local.batch_size=64"]
           for data in ("fmnist", "cifar10") for m in ("fedavg", "fedmud_bkd_aad")}


def stepper(cfg, method, x, y, channels_last: bool, stack: contextlib.ExitStack):
    """A training step (a function that returns its loss) of a fresh model of the run, in the layout
    asked for."""
    import torch

    from fedlora.training import images_channels_last, mean_loss

    model = method.initial_model()
    method.start_round(model, 1)
    method.set_trainable(model, 1)
    model.train()
    if channels_last:
        assert stack.enter_context(images_channels_last(model, x, torch.device("cpu")))
        x = x.contiguous(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.local.lr, momentum=cfg.local.momentum, weight_decay=cfg.local.weight_decay)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss, _ = mean_loss(model, x, y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def measure(overrides: list[str], steps: int, blocks: int) -> dict:
    import torch

    from fedlora.config import compose, resolve
    from fedlora.federated_data import client_tensors
    from fedlora.methods import make_method

    cfg = resolve(compose(overrides))
    method = make_method(cfg)
    x, y = client_tensors(cfg, 0)
    x, y = x[:cfg.local.batch_size], y[:cfg.local.batch_size]
    with contextlib.ExitStack() as stack:
        torch.manual_seed(0)
        default = stepper(cfg, method, x, y, False, stack)
        torch.manual_seed(0)
        last = stepper(cfg, method, x, y, True, stack)
        losses = {"default": [], "channels_last": []}
        times = {"default": [], "channels_last": []}
        for name, step in (("default", default), ("channels_last", last)):  # warm-up
            losses[name] += [step() for _ in range(2)]
        for _ in range(blocks):
            for name, step in (("default", default), ("channels_last", last)):
                started = time.perf_counter()
                losses[name] += [step() for _ in range(steps)]
                times[name].append((time.perf_counter() - started) / steps * 1000)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return {"ms_per_step": {k: round(v, 2) for k, v in ms.items()},
            "ratio": round(ms["default"] / ms["channels_last"], 2),
            "max_loss_difference": max(abs(a - b) for a, b in zip(losses["default"], losses["channels_last"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PRESETS), action="append")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=8)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    data_root = os.environ.get("FEDLORA_DATA", str(ROOT.parent / "shared" / "data"))
    out = {"machine": f"{platform.processor() or platform.machine()}, one thread", "torch": torch.__version__,
           "steps": args.steps, "blocks": args.blocks, "presets": {}}
    for name in args.only or PRESETS:
        out["presets"][name] = measure(PRESETS[name] + [f"data.root={data_root}"], args.steps, args.blocks)
        print(json.dumps({name: out["presets"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
