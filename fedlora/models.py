"""The FedMUD paper's CNNs and a CIFAR ResNet-18, and the dense model a run starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # Convs carry no bias: the BatchNorm that follows has its own.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class PoolCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU-maxpool stages [32, 64, 128, 256], then one Linear layer.

    Fashion-MNIST (1x28x28) leaves 256x1x1 features; SVHN (3x32x32) leaves 256x2x2 = 1024.
    """

    def __init__(self, in_channels: int, num_classes: int, features: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (32, 64, 128, 256):
            layers += _conv_bn_relu(cin, cout) + [nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class VGGCifar(nn.Module):
    """VGG-like: ten 3x3 conv-BN-ReLU [32, 32, 64, 64, 128, 128, 256, 256, 512, 512], a max-pool after
    each pair (32x32 -> 1x1), then Linear(512, classes)."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (32, 64, 128, 256, 512):
            layers += _conv_bn_relu(cin, cout) + _conv_bn_relu(cout, cout) + [nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no stem max-pool)."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return self.classifier(torch.flatten(self.pool(self.layers(out)), 1))


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[[int], nn.Module]  # num_classes -> model
    input_shape: tuple[int, int, int]  # (C, H, W) it takes


MODELS = {
    "fmnist_cnn": ModelSpec(lambda k: PoolCNN(1, k, 256), (1, 28, 28)),
    "svhn_cnn": ModelSpec(lambda k: PoolCNN(3, k, 1024), (3, 32, 32)),
    "vgg_cifar": ModelSpec(VGGCifar, (3, 32, 32)),
    "resnet18": ModelSpec(ResNet18, (3, 32, 32)),
}


def model_for_shape(shape: tuple[int, ...] | None) -> str:
    """The first paper model that takes inputs of `shape` ("" when none does)."""
    return next((name for name, spec in MODELS.items() if spec.input_shape == shape), "")


def build_model(name: str, num_classes: int, seed: int) -> nn.Module:
    """The model with its initial weights drawn from `seed` (on CPU, so identical everywhere)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name].builder(num_classes)


def dense_model(cfg) -> nn.Module:
    """The model a run starts from, before any factorization or adapter: drawn from the seed, or a
    pretrained one with a seeded head, read from its files for each model built (faster than a copy
    of one kept in memory, which would also hold the weights twice: 5 GB more for a 1B model)."""
    from fedlora.data import dataset_info
    from fedlora.seeds import derive_seed

    info, seed = dataset_info(cfg), derive_seed(cfg.seed, "model-init")
    if cfg.adapter is None:
        return build_model(cfg.model.name, info.num_classes, seed)
    from fedlora.precision import prepare

    if cfg.model.get("task") == "causal_lm":
        from fedlora.causal import CausalLM

        from fedlora.hf import load_causal_lm

        return prepare(CausalLM(load_causal_lm(cfg.model.hf, seed, cfg.model.num_layers)), cfg)
    from fedlora.hf import image_classifier, load_classifier
    from fedlora.text import TextClassifier

    hf = load_classifier(cfg.model.hf, info.num_classes, seed, cfg.model.num_layers, not info.text)
    return prepare(TextClassifier(hf) if info.text else image_classifier(hf, cfg.model.hf, info.mean, info.std), cfg)
