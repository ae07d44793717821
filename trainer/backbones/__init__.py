"""Vision and text backbones for the panel encoder.

Build one by name::

    vision = build_vision_backbone("efficientnet_lite0")   # pretrained, frozen
    text = build_text_backbone("hashed_bow")                # random, trainable
    features = vision(torch.stack([vision.preprocess(image) for image in images]))
    text_features = text(["Look out!", ""])                 # "" gives a zero row

``tiny_cnn`` and ``hashed_bow`` are small, randomly initialised and trainable. ``efficientnet_lite0`` and
``minilm`` load pretrained weights from installed packages, never from the network, and are frozen by default.
"""

from __future__ import annotations

from .base import Backbone, BackboneError, TextBackbone, VisionBackbone
from .text import HashedBagOfWords, MiniLM, hash_terms
from .vision import EfficientNetLite0, TinyCNN

VISION_BACKBONES = ("tiny_cnn", "efficientnet_lite0")
TEXT_BACKBONES = ("hashed_bow", "minilm")

__all__ = [
    "Backbone",
    "BackboneError",
    "EfficientNetLite0",
    "HashedBagOfWords",
    "MiniLM",
    "TEXT_BACKBONES",
    "TextBackbone",
    "TinyCNN",
    "VISION_BACKBONES",
    "VisionBackbone",
    "build_text_backbone",
    "build_vision_backbone",
    "hash_terms",
]


def build_vision_backbone(name: str, *, frozen: bool | None = None, pretrained: bool = True) -> VisionBackbone:
    """Build a vision backbone by name.

    Parameters
    ----------
    name : "tiny_cnn" or "efficientnet_lite0".
    frozen : freeze the parameters and keep the module in eval mode. None uses the backbone's default:
        False for tiny_cnn, True for efficientnet_lite0.
    pretrained : load the packaged ImageNet weights of efficientnet_lite0; False initialises it randomly.
        tiny_cnn has no pretrained weights and ignores it.
    """
    if name == "tiny_cnn":
        backbone: VisionBackbone = TinyCNN()
    elif name == "efficientnet_lite0":
        backbone = EfficientNetLite0(pretrained=pretrained)
    else:
        raise BackboneError(f"unknown vision backbone {name!r}; expected one of {', '.join(VISION_BACKBONES)}")
    backbone.set_frozen(backbone.default_frozen if frozen is None else frozen)
    return backbone


def build_text_backbone(name: str, *, frozen: bool | None = None) -> TextBackbone:
    """Build a text backbone by name.

    Parameters
    ----------
    name : "hashed_bow" or "minilm".
    frozen : freeze the parameters and keep the module in eval mode. None uses the backbone's default:
        False for hashed_bow, True for minilm.
    """
    if name == "hashed_bow":
        backbone: TextBackbone = HashedBagOfWords()
    elif name == "minilm":
        backbone = MiniLM()
    else:
        raise BackboneError(f"unknown text backbone {name!r}; expected one of {', '.join(TEXT_BACKBONES)}")
    backbone.set_frozen(backbone.default_frozen if frozen is None else frozen)
    return backbone
