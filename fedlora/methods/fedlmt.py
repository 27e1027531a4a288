"""FedLMT (Liu et al., ICML 2024): the adapted layers' weights are W = U V, trained from scratch; U
and V are averaged separately (`parametrizations.factorizations.LowRankWeight`)."""

from fedlora.methods.base import FactorizedMethod
from fedlora.methods.registry import register_method


@register_method("fedlmt")
class FedLMT(FactorizedMethod):
    factorization = "lowrank_weight"
