"""Mixed precision and activation checkpointing of a pretrained model (`model.precision`,
`model.gradient_checkpointing`), options for GPUs. The weights stay float32 (the adapters, the
frozen base and the arrays that travel alike): under bf16 or fp16 the forward pass runs in autocast,
and fp16's loss is scaled against underflow. On a CPU the model runs in float32, as it is."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger("fedlora")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DEVICES = ("cuda",)  # where model.precision applies
_told: set[str] = set()


def autocast(device: torch.device, precision: str, devices: tuple[str, ...] = AUTOCAST_DEVICES):
    """The context of a forward pass: autocast to bf16 or fp16 on a GPU; elsewhere, and for fp32, none."""
    dtype = DTYPES[precision]
    if dtype is None or device.type not in devices:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(model: nn.Module, device: torch.device) -> torch.amp.GradScaler:
    """fp16 on a GPU: a loss scaler (a fresh one each round, as each round's optimiser is); else one
    that does nothing."""
    fp16 = getattr(model, "precision", "fp32") == "fp16" and device.type in AUTOCAST_DEVICES
    return torch.amp.GradScaler(device.type, enabled=fp16)


def prepare(wrapper: nn.Module, cfg) -> nn.Module:
    """Give a pretrained model's wrapper (`TextClassifier`, `CausalLM`, `ImageClassifier`) the run's
    precision, and turn activation checkpointing on in its Hugging Face model (non-reentrant: the
    frozen base's inputs need no gradient); a causal LM then keeps no key-value cache in training."""
    wrapper.precision = cfg.model.get("precision", "fp32")
    if wrapper.precision != "fp32" and not torch.cuda.is_available() and wrapper.precision not in _told:
        _told.add(wrapper.precision)  # once a process
        log.info("model.precision=%s applies on a GPU; on this CPU the model runs in float32", wrapper.precision)
    if cfg.model.get("gradient_checkpointing"):
        hf = wrapper.model
        enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
        try:
            enable({"use_reentrant": False})
        except ValueError as e:  # a model class without it
            from fedlora.errors import ConfigError

            raise ConfigError(f"model.gradient_checkpointing=true: {e}") from e
        if getattr(hf.config, "use_cache", None):
            hf.config.use_cache = False
    return wrapper
