"""Methods by name, as PEFT registers its tuners: each method module registers its class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from fedlora.errors import ConfigError

if TYPE_CHECKING:
    from fedlora.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: `method=NAME` (conf/method/NAME.yaml, whose `method.name` is NAME) runs this class."""

    def register(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice ({METHODS[name].__module__}, {cls.__module__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]
