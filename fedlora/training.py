"""Local training and evaluation, deterministic for a given seed on CPU."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator

import torch
from torch import nn

from fedlora.parametrizations.base import weights_formed_once
from fedlora.precision import grad_scaler


class _HandBackWhenIdle:
    """Decorates a training and an evaluation: once a process has done neither for `after` seconds,
    glibc's `malloc_trim` hands back what they freed and the allocator kept (activations, gradients,
    kernels' scratch; 0.1 GB after a client of the paper's Fashion-MNIST CNN, more with each client an
    actor trains). Every client actor held it while the server evaluated, and the server part of its
    evaluation's while the clients trained: benchmarks/README.md. Not at once after each: an actor's
    next client of the round would fault the pages in again."""

    def __init__(self, after: float = 1.0):
        try:  # glibc's; elsewhere (musl, macOS, Windows) nothing to call
            self.trim = ctypes.CDLL(None).malloc_trim
            self.trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError, TypeError):
            self.trim = None
        self.after, self.timer, self.lock = after, None, threading.Lock()

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def __call__(self, work):
        if self.trim is None:
            return work

        @functools.wraps(work)
        def working(*args, **kwargs):
            with self.lock:
                self._cancel()
            try:
                return work(*args, **kwargs)
            finally:
                with self.lock:
                    self._cancel()
                    timer = threading.Timer(self.after, self.trim, (0,))
                    timer.daemon = True
                    try:
                        timer.start()
                        self.timer = timer
                    except RuntimeError:  # no thread to be had (a process limit, shutdown): nothing handed back
                        pass

        return working


hands_back_freed_memory = _HandBackWhenIdle()


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batch_order(n: int, batch_size: int, epochs: int, seed: int, steps: int | None = None) -> list[torch.Tensor]:
    """The mini-batches of row indices of `epochs` passes over n rows, each pass a fresh permutation
    drawn from `seed`; the last batch of a pass may be short. With `steps`, exactly that many batches
    instead, from as many passes as they take (the last one cut short)."""
    g = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    passes = 0
    while n > 0 and (len(batches) < steps if steps is not None else passes < epochs):
        batches += list(torch.randperm(n, generator=g).split(batch_size))
        passes += 1
    return batches[:steps] if steps is not None else batches


@contextlib.contextmanager
def images_channels_last(model: nn.Module, x: torch.Tensor, device: torch.device) -> Iterator[bool]:
    """On a CPU, a model of images (4-d inputs) runs its convolutions, batch norms and poolings with
    channels last (oneDNN's layout; training steps of the paper's CNN 1.32-1.34x faster: benchmarks/
    README.md, fix 10), and gets its weights back in PyTorch's default layout afterwards, so that
    nothing outside sees the other layout. Yields whether it did: its batches must then be put in
    that layout too. The results are those of the default layout up to floating-point rounding."""
    if device.type != "cpu" or x.dim() != 4:
        yield False
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        model.to(memory_format=torch.contiguous_format)


def _batch(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(summed loss, correct predictions, predictions) of a batch: a classifier predicts one label an
    example; a causal LM (`fedlora.causal.CausalLM`) each target token."""
    own = getattr(model, "scores", None)
    if own is not None:
        return own(x, y)
    out = model(x)
    return nn.functional.cross_entropy(out, y, reduction="sum"), int((out.argmax(1) == y).sum()), len(y)


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The loss a step descends, and over how many predictions it is the mean."""
    if getattr(model, "scores", None) is not None:
        loss_sum, _, n = model.scores(x, y)
        return loss_sum / max(n, 1), n
    return nn.functional.cross_entropy(model(x), y), len(y)


@hands_back_freed_memory
def train_local(model: nn.Module, x: torch.Tensor, y: torch.Tensor, local, seed: int,
                device: torch.device | None = None, dp=None) -> float:
    """SGD or AdamW over (x, y) as the `local` config says (`local.epochs` passes, or `local.steps`
    optimiser steps where set); returns the mean training loss. Dropout
    (in pretrained models) draws from `seed` too, so that a client's round is reproducible. With `dp`
    (a `fedlora.dp.DPSpec`), DP-SGD: `dp.steps` steps on Poisson samples, clipped and noised."""
    device = device or pick_device()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if local.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=local.lr, weight_decay=local.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=local.lr, momentum=local.momentum, weight_decay=local.weight_decay)
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dp is not None:
            from fedlora.dp import dp_step

            g = torch.Generator().manual_seed(seed)
            for _ in range(dp.steps):
                idx = (torch.rand(len(y), generator=g) < dp.sample_rate).nonzero().flatten()
                loss_sum, n = dp_step(model, x[idx].to(device), y[idx].to(device), dp, g, mean_loss)
                total, count = total + loss_sum, count + n
                opt.step()
        else:
            scaler = grad_scaler(model, device)  # fp16 on a GPU; else it passes the loss and the step through
            with images_channels_last(model, x, device) as last:
                for idx in batch_order(len(y), local.batch_size, local.epochs, seed, local.get("steps")):
                    xb, yb = _batch(x[idx], device, last), y[idx].to(device, non_blocking=True)
                    opt.zero_grad(set_to_none=True)
                    loss, n = mean_loss(model, xb, yb)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    total += loss.item() * n
                    count += n
    # A diverged run returns a non-finite loss and weights; the server's reply validation rejects them.
    return total / max(count, 1)


@hands_back_freed_memory
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             device: torch.device | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model on (x, y): per example, or per target token (a
    causal LM)."""
    device = device or pick_device()
    model.to(device).eval()
    loss_sum, correct, count = 0.0, 0, 0
    with images_channels_last(model, x, device) as last, weights_formed_once(model):
        for start in range(0, len(y), batch_size):
            xb, yb = _batch(x[start:start + batch_size], device, last), y[start:start + batch_size].to(device)
            batch_loss, batch_correct, n = scores(model, xb, yb)
            loss_sum, correct, count = loss_sum + batch_loss.item(), correct + batch_correct, count + n
    n = max(count, 1)
    return correct / n, loss_sum / n
