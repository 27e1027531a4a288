"""FedMUD's decompositions on a pretrained model: the aggregation-aware adapters, with and without MUD.

What a client trains: `adapter=aad_lora` (ΔW = L1 R1 + L2 R2, L1 and R2 frozen from the run seed, R1 and
L2 trained from zero) or `adapter=kron_aad` (each Kronecker block A1 ⊗ B1 + A2 ⊗ B2, A1 and B2 frozen),
and the new head. What travels: what trains, as in FedIT: (m + n) r numbers a layer for aad_lora,
LoRA's count. How the server combines: it averages what trains; the update is linear in it, so the
average is exactly the mean of the clients' updates, where FedIT's mean(B) mean(A) is not. Unlike
FFA-LoRA (exact too, with A frozen), the update's rank reaches 2r (aad_lora) or that of the grid of
Kronecker blocks (kron_aad), not r.

`aad_lora_mud` adds Model Update Decomposition: every `method.interval` rounds the update is folded into
the frozen weights and the factors are redrawn from a round seed, so the global model's update is not
bounded by one adapter's rank. The folded weights then travel down (`mud.MUD`).
"""

from __future__ import annotations

from fedlora.methods.base import AdapterMethod
from fedlora.methods.mud import MUD, MUDConfig
from fedlora.methods.registry import register_method


@register_method("aad_lora")
class AADLoRA(AdapterMethod):
    adapters = ("aad_lora", "kron_aad")
    adapters_because = "averages an update that is linear in what trains, which only the aggregation-aware adapters give"


@register_method("aad_lora_mud")
class AADLoRAMUD(MUD, AADLoRA):
    Config = MUDConfig
