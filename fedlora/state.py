"""A model's state as the arrays that travel, and back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn


def state_tensors(model: nn.Module, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the given entries of the model's state, on CPU, in the order given: they do not
    change when the model trains on."""
    state = model.state_dict()
    return {k: state[k].detach().to("cpu", copy=True) for k in keys}


def load_arrays(model: nn.Module, arrays: Mapping, required: Iterable[str] = ()) -> nn.Module:
    """Load arrays (numpy arrays, or anything with a `.numpy()`: tensors, Flower's Arrays) into the
    model's state; every key of `required` must be there, and every key must be an entry of the model."""
    missing = set(required) - set(arrays)
    if missing:
        raise KeyError(f"arrays lack model entries: {sorted(missing)[:5]}")
    unknown = set(arrays) - set(model.state_dict())
    if unknown:
        raise KeyError(f"arrays hold entries the model does not have: {sorted(unknown)[:5]}")
    state = {k: torch.from_numpy(np.array(a.numpy() if hasattr(a, "numpy") else a)) for k, a in arrays.items()}
    model.load_state_dict(state, strict=False)
    return model
