"""Zero padding (HetLoRA-style), the naive baseline for heterogeneous ranks that FLoRA and FlexLoRA are
compared with.

What a client trains: LoRA at its own rank r_k (`adapter.ranks`), and the head. What travels: down, the
global factors truncated to r_k (B's first r_k columns, A's first r_k rows); up, its factors at r_k.
How the server combines: it pads each client's B_k and A_k with zeros to the global rank
(adapter.r) and averages them as FedIT does. With equal ranks that is FedIT exactly; with unequal
ranks the higher-rank components are averaged over fewer real values, and the product is as biased as
FedIT's.
"""

from __future__ import annotations

from torch import nn

from fedlora.aggregate import Update, weighted_mean
from fedlora.methods.base import AdapterMethod
from fedlora.methods.registry import register_method
from fedlora.parametrizations.adapters import padded
from fedlora.state import load_arrays


@register_method("zero_pad")
class ZeroPad(AdapterMethod):
    adapters = ("lora", "lora_nonzero")
    adapters_because = "pads LoRA's factors B and A"
    heterogeneous = True

    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        r = self.adapter.r
        load_arrays(model, weighted_mean([Update(padded(u.arrays, r), u.num_examples) for u in updates]))
