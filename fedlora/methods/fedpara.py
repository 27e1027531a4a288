"""FedPara (Hyeon-Woo et al., ICLR 2022): W = (X1 Y1ᵀ) ⊙ (X2 Y2ᵀ), rank up to r² from 2r (m + n)
parameters, trained from scratch; all four factors averaged separately
(`parametrizations.factorizations.HadamardLowRank`)."""

from fedlora.methods.base import FactorizedMethod
from fedlora.methods.registry import register_method


@register_method("fedpara")
class FedPara(FactorizedMethod):
    factorization = "hadamard"
