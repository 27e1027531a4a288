"""Federated methods, one module each, registered by name (`registry.register_method`).

Every module of this package is imported here, so a new method is one module (and its
`conf/method/NAME.yaml`), with nothing else to edit.
"""

import importlib
import pkgutil

from fedlora.methods.base import AdapterMethod, FactorizedMethod, Method, MethodConfig
from fedlora.methods.registry import METHODS, method_class, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")


def make_method(cfg) -> Method:
    """The method that a resolved config names."""
    return method_class(cfg.method.name)(cfg)


__all__ = ["METHODS", "AdapterMethod", "FactorizedMethod", "Method", "MethodConfig", "make_method", "method_class",
           "register_method"]
