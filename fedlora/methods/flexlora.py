"""FlexLoRA (Bai et al., NeurIPS 2024): the server forms the full-size update Σ_k p_k B_k A_k of each
adapted layer from the clients' LoRA factors (p_k their shares of the examples), takes its SVD, and
sends every client the rank-r truncation as new factors: the global update is exact up to the
truncation, which is the best rank-r approximation of the mean of the clients' updates. The split of
the truncation U_r Σ_r V_rᵀ into B and A is ours (√Σ_r on each side): the product is what the method
fixes.

With heterogeneous ranks (`adapter.ranks`), the global factors have rank adapter.r; a client of rank
r_k receives their first r_k columns of B and rows of A, the best rank-r_k approximation, and its
factors are padded with zeros for the sum (which leaves B_k A_k as it is).

The head (and anything else that trains besides the adapters) is averaged as in FedAvg. The update
must be a product B A, so the adapter is LoRA (zero or non-zero initialisation), not BoRA.
"""

from __future__ import annotations

from torch import nn

from fedlora.aggregate import Update, truncated_factors
from fedlora.methods.base import AdapterMethod, mean_besides, mean_update
from fedlora.methods.registry import register_method
from fedlora.parametrizations.adapters import padded
from fedlora.parametrizations.base import delta_key, delta_layers
from fedlora.state import load_arrays


@register_method("flexlora")
class FlexLoRA(AdapterMethod):
    adapters = ("lora", "lora_nonzero")
    heterogeneous = True  # clients of a lower rank receive the truncation to their rank, and send at it
    adapters_because = "splits the SVD of Σ p_k B_k A_k back into LoRA's factors B and A, so the update must be B A"

    def aggregate(self, model: nn.Module, updates: list[Update]) -> None:
        r = self.adapter.r  # a client of a lower rank: its factors padded with zeros, B_k A_k unchanged
        mean = mean_update(model, [Update(padded(u.arrays, r), u.num_examples) for u in updates])  # Σ p_k B_k A_k
        new = mean_besides(model, updates, ("lora_A", "lora_B"))  # the head
        for name, layer in delta_layers(model):
            b, a = truncated_factors(mean[name].double().cpu().numpy(), layer.delta.r)
            for key, value in ((delta_key(name, "lora_B"), b), (delta_key(name, "lora_A"), a)):
                new[key] = value.astype(updates[0].arrays[key].dtype)
        load_arrays(model, new)
