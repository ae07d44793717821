"""The panel encoder: gated fusion masking, single-modality embeddings, frozen backbones, checkpoint state."""

from __future__ import annotations

import torch

from trainer.backbones import build_text_backbone, build_vision_backbone
from trainer.config import ModelConfig
from trainer.data import PanelBatch
from trainer.model import GatedFusion, PanelEncoder

DIM = 16


def encoder(**backbone_options) -> PanelEncoder:
    torch.manual_seed(0)
    vision = build_vision_backbone("tiny_cnn", frozen=backbone_options.get("vision_frozen"))
    text = build_text_backbone("hashed_bow", frozen=backbone_options.get("text_frozen"))
    config = ModelConfig(dim=DIM, projection_hidden=24, layout_hidden=8, dropout=0.0)
    return PanelEncoder(vision, text, config).eval()


def feature_batch(model: PanelEncoder, seed: int = 0) -> PanelBatch:
    generator = torch.Generator().manual_seed(seed)
    return PanelBatch(
        page=torch.tensor([0, 0, 1, 1]),
        dataset_page=torch.tensor([4, 4, 9, 9]),
        layout=torch.rand(4, 7, generator=generator),
        has_text=torch.tensor([True, False, True, False]),
        vision_features=torch.randn(4, model.vision_backbone.out_dim, generator=generator),
        text_features=torch.randn(4, model.text_backbone.out_dim, generator=generator),
    )


def test_outputs_have_embedding_dimension():
    model = encoder()
    output = model(feature_batch(model))
    for tensor in (output.fused, output.vision, output.text):
        assert tensor.shape == (4, DIM)
        assert torch.isfinite(tensor).all()


def test_absent_text_contributes_nothing():
    model = encoder()
    batch = feature_batch(model)
    before = model(batch).fused
    batch.text_features = batch.text_features.clone()
    batch.text_features[[1, 3]] += 5.0
    after = model(batch).fused
    assert torch.allclose(before[[1, 3]], after[[1, 3]])

    batch.text_features[[0, 2]] += 5.0
    changed = model(batch).fused
    assert not torch.allclose(before[[0, 2]], changed[[0, 2]])


def test_single_modality_embeddings_ignore_other_inputs():
    model = encoder()
    batch = feature_batch(model)
    first = model(batch)
    other = feature_batch(model, seed=1)

    vision_changed = PanelBatch(**{**batch.__dict__, "vision_features": other.vision_features})
    rest_changed = PanelBatch(**{**batch.__dict__, "text_features": other.text_features, "layout": other.layout})

    assert torch.allclose(model(rest_changed).vision, first.vision)
    assert not torch.allclose(model(vision_changed).vision, first.vision)
    assert torch.allclose(model(vision_changed).text, first.text)
    assert torch.allclose(model.embed_vision_only(batch), first.vision)
    assert torch.allclose(model.embed_text_only(batch), first.text)
    assert torch.allclose(model.embed_fused(batch), first.fused)


def test_fusion_single_modality_is_normalised():
    fusion = GatedFusion(DIM)
    parts = torch.randn(3, 3, DIM)
    present = torch.tensor([[True, False, False]] * 3)
    assert torch.allclose(fusion(parts, present), fusion.norm(parts[:, 0]))


def test_trainable_backbones_run_on_raw_inputs():
    model = encoder().train()
    batch = PanelBatch(
        page=torch.tensor([0, 0, 1]),
        dataset_page=torch.tensor([0, 0, 1]),
        layout=torch.rand(3, 7),
        has_text=torch.tensor([True, True, False]),
        pixels=torch.randn(3, 3, 64, 64),
        texts=["a dog barks", "the sun sets", ""],
    )
    output = model(batch)
    output.fused.sum().backward()
    assert model.vision_backbone.layers[0].weight.grad is not None
    assert model.text_backbone.embedding.weight.grad is not None


def test_frozen_backbone_stays_in_eval_mode_without_gradients():
    model = encoder(vision_frozen=True)
    model.train()
    assert model.vision_backbone.training is False
    assert all(not parameter.requires_grad for parameter in model.vision_backbone.parameters())
    assert model.vision_projection.training is True


def test_checkpoint_state_keeps_small_backbones_and_reloads():
    model = encoder(vision_frozen=True)
    state = model.checkpoint_state_dict()
    assert any(key.startswith("vision_backbone.") for key in state)
    assert any(key.startswith("text_backbone.") for key in state)

    copy = encoder(vision_frozen=True)
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(1.0)
    copy.load_checkpoint_state_dict(state)
    batch = feature_batch(model)
    assert torch.equal(copy(batch).fused, model(batch).fused)


def test_checkpoint_state_leaves_out_packaged_frozen_backbone():
    vision = build_vision_backbone("efficientnet_lite0")
    text = build_text_backbone("hashed_bow")
    model = PanelEncoder(vision, text, ModelConfig(vision_backbone="efficientnet_lite0", dim=DIM))
    assert model.excluded_state_prefixes() == ["vision_backbone."]
    state = model.checkpoint_state_dict()
    assert not any(key.startswith("vision_backbone.") for key in state)
    assert any(key.startswith("text_backbone.") for key in state)
    model.load_checkpoint_state_dict(state)
