"""Differential privacy. `dp.where=client` (the default): DP-SGD (Abadi et al., 2016) in each
client's local training, below. `dp.where=server`: central DP, each client's update clipped on the
server and the average noised (`strategies/central_dp.py`), counted here by `CentralLedger`.

Each step draws a Poisson sample of the client's examples (each one in with probability q =
local.batch_size / n, from the client's training seed), computes every example's gradient of what
trains (a backward pass each: slower than Opacus's per-layer hooks, but exact for any module, the
adapters and a pretrained model's masking included), clips each to norm `dp.max_grad_norm` (C), sums
them, adds Gaussian noise of standard deviation σ C, and divides by the expected batch size q n.
Privacy is counted by Opacus's RDP accountant for the subsampled Gaussian mechanism, per client: the
server keeps each client's steps (σ, q, steps a round it trained) and writes the largest ε spent so
far into metrics.jsonl every round (`dp_epsilon`), each client's into the summary; it is part of the
checkpoint, so a resume goes on counting.

σ is `dp.noise_multiplier`, or, given a target `dp.epsilon`, the smallest σ (Opacus's search) with
which a client that trains in every one of the run's rounds spends at most ε at `dp.delta`: each
client finds its own, for its own q and number of steps.

BatchNorm mixes the examples of a batch, so one example's gradient is not its own: DP-SGD refuses
models with BatchNorm (the paper CNNs), as Opacus does; fine-tune a pretrained model with adapters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from fedlora.errors import ConfigError


@dataclass(frozen=True)
class DPSpec:
    """One client's DP-SGD: noise multiplier σ, clipping bound C, sampling rate q, steps a round, and
    the expected batch size q n by which the noised sum is divided (Opacus's convention)."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    expected_batch: float


def enabled(cfg: DictConfig) -> bool:
    return cfg.dp.noise_multiplier is not None or cfg.dp.epsilon is not None


def client_side(cfg: DictConfig) -> bool:
    """Whether clients train with DP-SGD."""
    return enabled(cfg) and cfg.dp.where == "client"


def check_model(model: nn.Module) -> None:
    """ConfigError for a model that DP-SGD cannot train: one with BatchNorm (central DP takes it)."""
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        raise ConfigError(f"dp: the model has BatchNorm ({norms[0]}, ...), which mixes the examples of a batch, so "
                          "DP-SGD cannot bound one example's gradient (Opacus refuses it too); use a pretrained model "
                          "with adapters (dataset=agnews, or model=vit), central DP (dp.where=server), or leave dp.* "
                          "unset")


@lru_cache(maxsize=4096)
def _noise_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's note on the range of RDP orders
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=steps, accountant="rdp"))


def client_spec(cfg: DictConfig, num_examples: int) -> DPSpec:
    """The DP-SGD of a client with `num_examples` training examples (the same on the server, which
    counts its privacy): `local.steps` steps a round, or `local.epochs` passes of n / batch steps."""
    q = min(1.0, cfg.local.batch_size / max(num_examples, 1))
    steps = int(cfg.local.steps) if cfg.local.get("steps") else max(1, round(cfg.local.epochs / q))
    sigma = cfg.dp.noise_multiplier
    if sigma is None:
        sigma = _noise_for(float(cfg.dp.epsilon), float(cfg.dp.delta), q, steps * cfg.num_rounds)
    return DPSpec(float(sigma), float(cfg.dp.max_grad_norm), q, steps, q * num_examples)


def epsilon(history: list[list[float]], delta: float) -> float:
    """ε spent at `delta` by a client whose DP-SGD steps were `history`: [σ, q, steps] per round it trained."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def dp_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: DPSpec, generator: torch.Generator,
            mean_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]) -> tuple[float, int]:
    """Set the gradients of what trains to one DP-SGD step's on the batch (x, y): each example's
    gradient (one backward pass each: exact for any module, a pretrained model's data-dependent
    masking included) clipped to norm C, summed, noised with N(0, σ² C²), over the expected batch
    size; `mean_loss(model, x, y)` is the loss of a batch and the predictions it is the mean over
    (`fedlora.training.mean_loss`). Returns the batch's summed loss and its number of predictions."""

    params = [p for p in model.parameters() if p.requires_grad]
    summed = [torch.zeros_like(p) for p in params]
    total, count = 0.0, 0
    for xi, yi in zip(x, y):
        loss, n = mean_loss(model, xi[None], yi[None])  # an example's: its tokens' mean, for a causal LM
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        scale = min(1.0, spec.max_grad_norm / (float(norm) + 1e-6))
        for s, g in zip(summed, grads):
            s.add_(g, alpha=scale)
        total, count = total + float(loss.detach()) * n, count + n
    for p, s in zip(params, summed):
        noise = torch.normal(0.0, spec.noise_multiplier * spec.max_grad_norm, tuple(p.shape), generator=generator)
        p.grad = (s + noise.to(p.device)) / spec.expected_batch
    return total, count


class PrivacyLedger:
    """The server's count of each client's privacy: `record` (kept in the run's summary and
    checkpoint) holds, per partition, the DP-SGD steps of every round it trained and the ε they spend."""

    def __init__(self, cfg: DictConfig, record: dict):
        self.cfg = cfg
        self.record = record
        record.setdefault("delta", float(cfg.dp.delta))
        record.setdefault("history", {})
        record.setdefault("epsilon", {})

    def trained(self, examples_of: dict[int, int]) -> float:
        """Count a round in which the clients of `examples_of` (partition -> its training examples)
        trained; the largest ε any client has spent so far."""
        for pid, n in sorted(examples_of.items()):
            spec = client_spec(self.cfg, n)
            history = self.record["history"].setdefault(str(pid), [])
            history.append([spec.noise_multiplier, spec.sample_rate, spec.steps])
            self.record["epsilon"][str(pid)] = epsilon(history, self.record["delta"])
        return max(self.record["epsilon"].values(), default=0.0)


def central_noise(cfg: DictConfig) -> float:
    """σ of central DP: `dp.noise_multiplier`, or the smallest with which the run's rounds, each one
    Gaussian release without amplification by sampling, spend at most `dp.epsilon` at `dp.delta`."""
    if cfg.dp.noise_multiplier is not None:
        return float(cfg.dp.noise_multiplier)
    return _noise_for(float(cfg.dp.epsilon), float(cfg.dp.delta), 1.0, int(cfg.num_rounds))


class CentralLedger:
    """The server's count of central DP (`record`, kept in the run's summary and checkpoint): the
    rounds released, each a Gaussian mechanism of noise multiplier σ on the clipped updates' average,
    and the ε they spend, for every client alike."""

    def __init__(self, cfg: DictConfig, record: dict):
        self.record = record
        record.setdefault("where", "server")
        record.setdefault("delta", float(cfg.dp.delta))
        record.setdefault("noise_multiplier", central_noise(cfg))
        record.setdefault("max_grad_norm", float(cfg.dp.max_grad_norm))
        record.setdefault("releases", 0)
        record.setdefault("epsilon", 0.0)

    def released(self, count: int) -> float:
        """Count `count` (0 or 1) more rounds released; the ε spent so far."""
        self.record["releases"] += count
        r = self.record
        r["epsilon"] = epsilon([[r["noise_multiplier"], 1.0, r["releases"]]], r["delta"]) if r["releases"] else 0.0
        return r["epsilon"]
