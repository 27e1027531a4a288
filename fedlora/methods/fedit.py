"""FedIT (Zhang et al., ICASSP 2024): clients train the adapters' A and B (and the new head); the
server averages A and B separately. Its aggregate is biased: mean(B) mean(A) is not the mean of the
clients' B_k A_k."""

from fedlora.methods.base import AdapterMethod
from fedlora.methods.registry import register_method


@register_method("fedit")
class FedIT(AdapterMethod):
    """FedAvg over the adapters and the head, as `AdapterMethod` does."""
