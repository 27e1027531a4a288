"""One base layer for every parametrization: a frozen base weight plus a seeded trainable delta.

Every adapted layer sees its weight as an m x n matrix: a Linear's (out, in) weight, or for a Conv2d
with an (out, in, k1, k2) kernel the (out*k1) x (in*k2) matrix whose row-major reshape is the kernel.

- A `Delta` builds an m x n matrix ΔW from factors. Its trainable factors are parameters; the factors
  it keeps frozen by construction (FedMUD's AAD) are non-persistent buffers, never sent and never
  loaded: `reset(seed)` draws every factor from the seed on CPU, so every process and device holds
  identical values. A method may also freeze a parameter at its seeded value (FFA-LoRA's A): it then
  stays a parameter that does not train, and does not travel either.
- A `DeltaLayer` replaces a Conv2d or Linear: it computes the layer with the weight W + s ΔW
  (s = alpha / r for an adapter, 1 for FedMUD), or with ΔW alone when the delta *is* the weight
  (FedLMT, FedPara). `fold` adds s ΔW into W, and the caller redraws the delta (FedMUD's MUD);
  `as_base` gives the merged layer as a plain Conv2d or Linear (an adapter's export).

FedMUD's factorizations (`factorizations.py`) and the adapters (`adapters.py`) are both Deltas, so
each works on any model's Conv2d and Linear layers: `inject` puts them in, `delta_layers` finds them,
`reset_deltas` draws them all from one seed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedlora.seeds import derive_seed


class Delta(nn.Module):
    """An m x n matrix built from factors. `reset(seed)` draws every factor (frozen and trainable
    alike); `trainable_count` is the number of parameters that train. A `factored` delta applies its
    factors to an input without forming the matrix (`forward`), at a fraction of a dense layer's cost."""

    factored = False

    def __init__(self, m: int, n: int):
        super().__init__()
        self.m, self.n = m, n

    def _factor(self, name: str, shape: tuple[int, ...], trainable: bool) -> None:
        if trainable:
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))
        else:
            self.register_buffer(name, torch.zeros(shape), persistent=False)

    def _set(self, name: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            getattr(self, name).copy_(value)

    def reset(self, seed: int) -> None:
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """ΔW, unscaled."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, scaling: float) -> torch.Tensor:
        """x (s ΔW)ᵀ, for a Linear layer's input; a delta that can do it without forming ΔW overrides this."""
        return F.linear(x, scaling * self.matrix())

    @property
    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def matrix_shape(weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(out, in) for a Linear weight; (out*k1, in*k2) for an (out, in, k1, k2) kernel."""
    if len(weight_shape) == 2:
        return int(weight_shape[0]), int(weight_shape[1])
    out, cin, k1, k2 = weight_shape
    return int(out * k1), int(cin * k2)


class DeltaLayer(nn.Module):
    """A Conv2d or Linear whose weight is W + s ΔW, W frozen.

    - `replace_weight`: the weight is ΔW alone (W is dropped): a factorized weight trained from scratch.
    - `additive` (Linear layers only, the adapters' way): y = layer(x; W) + s · delta(dropout(x)),
      without forming ΔW, for a `factored` delta (LoRA, BoRA, low rank) or under dropout while
      training; otherwise, and for every non-additive layer, the layer runs once with W + s ΔW (for
      Kronecker blocks on MiniLM: 3 matmuls against 5 with the formed ΔW applied apart, 1.8x the dense
      layer's forward + backward before, see benchmarks/layer_cost.py).
    - `train_bias`: the base bias stays trainable (FedMUD keeps it dense); otherwise it is frozen.
    - `subtract_initial`: `reset` takes the drawn s ΔW out of W, so a non-zero initial delta leaves
      the layer's output as it was (relative to the original W however often it is reset).
    """

    def __init__(self, base: nn.Conv2d | nn.Linear, delta: Delta, *, scaling: float = 1.0, dropout: float = 0.0,
                 replace_weight: bool = False, additive: bool = False, train_bias: bool = False,
                 subtract_initial: bool = False):
        super().__init__()
        if additive and not isinstance(base, nn.Linear):
            raise ValueError("an additive delta needs a Linear layer")
        if dropout > 0 and not additive:
            raise ValueError("dropout on the layer's input needs an additive delta (a Linear layer)")
        self.weight_shape = tuple(base.weight.shape)
        self._conv = (dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
                      if isinstance(base, nn.Conv2d) else None)
        # the base layer's own tensors: it is replaced, so nothing else holds them
        self.weight = None if replace_weight else nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=train_bias)
        self.delta = delta
        self.scaling, self.additive, self.subtract_initial = scaling, additive, subtract_initial
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._subtracted: torch.Tensor | None = None  # what reset took out of W
        self._formed: torch.Tensor | None = None  # W + s ΔW, kept within `weights_formed_once`
        self._keep_formed = False

    def scaled_delta(self) -> torch.Tensor:
        """s ΔW in the weight's shape."""
        d = self.delta.matrix()
        return (d if self.scaling == 1.0 else self.scaling * d).reshape(self.weight_shape)

    def full_weight(self) -> torch.Tensor:
        d = self.scaled_delta()
        return d if self.weight is None else d + self.weight

    def _layer(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._conv is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, **self._conv)

    def _formed_weight(self) -> torch.Tensor:
        """W + s ΔW: formed at every call, but once within `weights_formed_once` without gradients."""
        if not self._keep_formed or torch.is_grad_enabled():
            return self.full_weight()
        if self._formed is None:
            self._formed = self.full_weight()
        return self._formed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.additive and (self.delta.factored or (self.training and isinstance(self.dropout, nn.Dropout))):
            return self._layer(x, self.weight) + self.delta(self.dropout(x), self.scaling)
        return self._layer(x, self._formed_weight())

    def reset(self, seed: int) -> None:
        self.delta.reset(seed)
        if self.subtract_initial:
            with torch.no_grad():
                if self._subtracted is not None:
                    self.weight += self._subtracted.to(self.weight.device)
                self._subtracted = self.scaled_delta().to(self.weight.dtype).clone()
                self.weight -= self._subtracted

    def fold(self, change: torch.Tensor | None = None) -> None:
        """W += s ΔW, or W += `change` (an m x n matrix, scaled) where given; after a fold of the delta
        the caller redraws it (FedMUD's fold and redraw), and what `reset` had taken out of W is part
        of what was folded: the next reset does not put it back."""
        with torch.no_grad():
            if change is None:
                self.weight += self.scaled_delta().to(self.weight.dtype)
                self._subtracted = None
            else:
                self.weight += change.reshape(self.weight_shape).to(self.weight)

    def as_base(self) -> nn.Module:
        """A plain Conv2d or Linear with the weight W + s ΔW (the layer merged)."""
        weight = self.full_weight().detach()
        out, cin = self.weight_shape[:2]
        like = dict(bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        if self._conv is None:
            layer = nn.Linear(cin, out, **like)
        else:
            layer = nn.Conv2d(cin * self._conv["groups"], out, self.weight_shape[2:], **self._conv, **like)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


@contextlib.contextmanager
def weights_formed_once(model: nn.Module) -> Iterator[None]:
    """Within, without gradients, each DeltaLayer of the model forms W + s ΔW at its first call and
    reuses it (an evaluation's batches, between which nothing changes: VGG's FedMUD evaluation
    1.09-1.25x faster, benchmarks/README.md, fix 12); outside, and with gradients, at every call."""
    layers = [m for m in model.modules() if isinstance(m, DeltaLayer)]
    for layer in layers:
        layer._formed, layer._keep_formed = None, True
    try:
        yield
    finally:
        for layer in layers:
            layer._formed, layer._keep_formed = None, False


# ---------------------------------------------------------------- finding and replacing layers


def matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule for target_modules: the module's name is a target or ends with '.' + a target;
    a target written as `re:PATTERN` is a regular expression matched against the whole name."""
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def adaptable_layers(model: nn.Module, targets: Sequence[str] | None = None,
                     kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> list[tuple[str, nn.Module]]:
    """The layers a delta can replace, in registration order, in any container: Linear and
    (ungrouped, zero-padded) Conv2d layers of the given kinds, named by `targets` if given; never the
    projections that a MultiheadAttention reads directly."""
    inside_attention = {f"{n}.{c}" if n else c for n, m in model.named_modules()
                        if isinstance(m, nn.MultiheadAttention) for c, _ in m.named_children()}
    found = []
    for name, m in model.named_modules():
        if name in inside_attention or type(m) not in kinds or (targets is not None and not matches(name, targets)):
            continue
        if type(m) is nn.Conv2d and (m.groups != 1 or m.padding_mode != "zeros"):
            continue
        found.append((name, m))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def inject(model: nn.Module, layers: Sequence[tuple[str, nn.Module]],
           make: Callable[[str, nn.Module], DeltaLayer]) -> list[str]:
    """Replace each (name, layer) by `make(name, layer)`, in place. Returns the names."""
    for name, layer in layers:
        replace_module(model, name, make(name, layer))
    return [name for name, _ in layers]


def delta_layers(model: nn.Module) -> list[tuple[str, DeltaLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLayer)]


def delta_key(layer: str, factor: str) -> str:
    """The state entry of factor `factor` of the delta layer named `layer`."""
    return f"{layer}.delta.{factor}"


def reset_deltas(model: nn.Module, seed: int) -> None:
    """Every layer's delta from (seed, layer name), so that any process draws the same values."""
    for name, layer in delta_layers(model):
        layer.reset(derive_seed(seed, name))
