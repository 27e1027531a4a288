"""FFA-LoRA (Sun et al., ICLR 2024): A stays at its seeded initial value on every client and is never
sent; only B (and the head) train and travel. About half of FedIT's uplink, and since the update
B A is linear in B, the average of the B's gives the average update exactly."""

from __future__ import annotations

from torch import nn

from fedlora.methods.base import AdapterMethod
from fedlora.methods.registry import register_method
from fedlora.parametrizations.base import delta_layers


@register_method("ffa_lora")
class FFALoRA(AdapterMethod):
    adapters = ("lora", "lora_nonzero", "bora")
    adapters_because = "trains only the adapter's B"

    def build(self, dense: nn.Module, rank: int | None = None) -> nn.Module:
        model = super().build(dense, rank)
        # A, and BoRA's σ (which mixes A's blocks), keep their seeded values: frozen, so never sent
        for _, layer in delta_layers(model):
            for name, p in layer.delta.named_parameters():
                if name != "lora_B":
                    p.requires_grad_(False)
        return model
