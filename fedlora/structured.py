"""A config section checked against its dataclass: the keys a method or an adapter takes, and their
types; and a config as flat dotted keys, matched against key patterns."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fedlora.errors import ConfigError

T = TypeVar("T")


def typed(schema: type[T], section: DictConfig | dict, where: str) -> T:
    """`section` as an instance of the dataclass `schema`, its values converted to the declared types;
    an unknown key, a value of the wrong type or a missing value is a ConfigError naming `where`
    (such as "method=fedmud") and the keys it takes."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), section))
    except ConfigKeyError as e:
        raise ConfigError(f"{where} has no setting '{e.key}'; its settings: {settings(schema)}") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]} (its settings: {settings(schema)})") from e


def settings(schema: type) -> str:
    """The keys a section takes, for a message."""
    return ", ".join(f.name for f in fields(schema) if f.name != "name") or "none"


def as_dict(obj: Any) -> dict:
    """A typed section back as plain values, for the resolved config."""
    return OmegaConf.to_container(OmegaConf.structured(obj))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"partition.alpha": 0.3, ...}."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def matches_any(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether a dotted key is one of `patterns`, or lies in a section among them (one ending in ".")."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)
