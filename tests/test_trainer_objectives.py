"""The three objectives: values against loop references, active counts, detaching and symmetry."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ObjectivesConfig, load_config
from trainer.model import PanelEmbeddings
from trainer.objectives import (
    Objectives,
    choose_masked_panels,
    image_text_alignment,
    masked_reconstruction,
    supervised_contrastive,
)

# Pages of 3, 1, 2 and 4 panels; panels 1, 3 and 8 have no text.
PAGE = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
HAS_TEXT = torch.tensor([True, False, True, False, True, True, True, True, False, True])
DIM = 8


def embeddings(seed: int = 0, requires_grad: bool = False) -> PanelEmbeddings:
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(len(PAGE), DIM, generator=generator) for _ in range(3)]
    if requires_grad:
        for tensor in tensors:
            tensor.requires_grad_(True)
    return PanelEmbeddings(*tensors)


def reference_supcon(z: torch.Tensor, page: torch.Tensor, temperature: float) -> float:
    z = torch.nn.functional.normalize(z, dim=-1).double()
    losses = []
    for i in range(len(z)):
        positives = [j for j in range(len(z)) if j != i and page[j] == page[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(len(z)) if k != i)
        losses.append(-sum(float(z[i] @ z[p]) / temperature - math.log(denominator) for p in positives) / len(positives))
    return sum(losses) / len(losses)


def reference_infonce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> float:
    query = torch.nn.functional.normalize(query, dim=-1).double()
    key = torch.nn.functional.normalize(key, dim=-1).double()
    losses = []
    for i in range(len(query)):
        scores = [float(query[i] @ key[j]) / temperature for j in range(len(key))]
        losses.append(-(scores[i] - math.log(sum(math.exp(s) for s in scores))))
    return sum(losses) / len(losses)


def test_contrastive_matches_loop_reference():
    z = embeddings().fused
    value, active = supervised_contrastive(z, PAGE, 0.07)
    assert float(value) == pytest.approx(reference_supcon(z, PAGE, 0.07), rel=1e-5)
    # Every panel except the single panel of page 1 has a positive.
    assert active == 9


def test_contrastive_zero_without_positives_keeps_graph():
    z = torch.randn(4, DIM, requires_grad=True)
    value, active = supervised_contrastive(z, torch.arange(4), 0.07)
    assert active == 0
    assert float(value.detach()) == 0.0
    value.backward()
    assert torch.count_nonzero(z.grad) == 0


def test_temperature_changes_contrastive_value():
    z = embeddings().fused
    cold, _ = supervised_contrastive(z, PAGE, 0.07)
    warm, _ = supervised_contrastive(z, PAGE, 0.5)
    assert float(warm) == pytest.approx(reference_supcon(z, PAGE, 0.5), rel=1e-5)
    assert abs(float(cold) - float(warm)) > 1e-3


def test_alignment_matches_reference_and_is_symmetric():
    batch = embeddings()
    value, active = image_text_alignment(batch.vision, batch.text, HAS_TEXT, 0.1, symmetric=True)
    rows = torch.nonzero(HAS_TEXT).flatten()
    vision, text = batch.vision[rows], batch.text[rows]
    expected = (reference_infonce(vision, text, 0.1) + reference_infonce(text, vision, 0.1)) / 2
    assert active == 7
    assert float(value) == pytest.approx(expected, rel=1e-5)

    swapped, _ = image_text_alignment(batch.text, batch.vision, HAS_TEXT, 0.1, symmetric=True)
    assert float(swapped) == pytest.approx(float(value), rel=1e-6)


def test_legacy_alignment_is_one_directional():
    batch = embeddings()
    value, _ = image_text_alignment(batch.vision, batch.text, HAS_TEXT, 0.1, symmetric=False)
    rows = torch.nonzero(HAS_TEXT).flatten()
    assert float(value) == pytest.approx(reference_infonce(batch.vision[rows], batch.text[rows], 0.1), rel=1e-5)
    swapped, _ = image_text_alignment(batch.text, batch.vision, HAS_TEXT, 0.1, symmetric=False)
    assert abs(float(swapped) - float(value)) > 1e-3


def test_alignment_zero_with_fewer_than_two_pairs():
    batch = embeddings()
    one_pair = torch.zeros(len(PAGE), dtype=torch.bool)
    one_pair[2] = True
    value, active = image_text_alignment(batch.vision, batch.text, one_pair, 0.1)
    assert active == 1
    assert float(value) == 0.0


def test_masked_panel_choice_is_seeded_and_within_page():
    eligible, targets = choose_masked_panels(PAGE, torch.Generator().manual_seed(4))
    again_eligible, again_targets = choose_masked_panels(PAGE, torch.Generator().manual_seed(4))
    assert eligible.tolist() == [0, 2, 3]
    assert torch.equal(eligible, again_eligible)
    assert torch.equal(targets, again_targets)
    for page, target in zip(eligible.tolist(), targets.tolist()):
        assert PAGE[target] == page

    draws = {tuple(choose_masked_panels(PAGE, torch.Generator().manual_seed(seed))[1].tolist()) for seed in range(30)}
    assert len(draws) > 1


def test_reconstruction_value_matches_manual_computation():
    z = embeddings().fused
    head = torch.nn.Linear(DIM, DIM).requires_grad_(False)
    value, active = masked_reconstruction(z, PAGE, head, torch.Generator().manual_seed(1))
    eligible, targets = choose_masked_panels(PAGE, torch.Generator().manual_seed(1))
    errors = []
    for page, target in zip(eligible.tolist(), targets.tolist()):
        others = [i for i in range(len(PAGE)) if PAGE[i] == page and i != target]
        prediction = head(z[others].mean(dim=0))
        errors.append(((prediction - z[target]) ** 2).mean())
    assert active == 3
    assert float(value) == pytest.approx(float(torch.stack(errors).mean()), rel=1e-5)


def reconstruction_gradients(detach_target: bool, detach_context: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    z = embeddings(requires_grad=True).fused
    head = torch.nn.Linear(DIM, DIM)
    value, _ = masked_reconstruction(
        z, PAGE, head, torch.Generator().manual_seed(2), detach_target=detach_target, detach_context=detach_context
    )
    value.backward()
    _, targets = choose_masked_panels(PAGE, torch.Generator().manual_seed(2))
    return z.grad, targets


def test_no_gradient_reaches_reconstruction_target():
    grad, targets = reconstruction_gradients(detach_target=True)
    assert torch.count_nonzero(grad[targets]) == 0
    context = [i for i in range(len(PAGE)) if i not in targets.tolist() and i != 3]
    assert torch.all(grad[context].abs().sum(dim=1) > 0)


def test_legacy_gradient_reaches_reconstruction_target():
    grad, targets = reconstruction_gradients(detach_target=False)
    assert torch.all(grad[targets].abs().sum(dim=1) > 0)


def test_detach_context_stops_context_gradient():
    grad, targets = reconstruction_gradients(detach_target=False, detach_context=True)
    context = [i for i in range(len(PAGE)) if i not in targets.tolist()]
    assert torch.count_nonzero(grad[context]) == 0
    assert torch.all(grad[targets].abs().sum(dim=1) > 0)


def test_reconstruction_zero_without_multi_panel_pages():
    z = torch.randn(3, DIM, requires_grad=True)
    value, active = masked_reconstruction(z, torch.arange(3), torch.nn.Linear(DIM, DIM), None)
    assert active == 0
    assert float(value.detach()) == 0.0
    value.backward()


@torch.no_grad()
def test_total_is_weighted_sum_of_components():
    config = load_config(None, ["objectives.weights.contrastive=0.25", "objectives.weights.reconstruction=2", "objectives.weights.alignment=0.7"])
    objectives = Objectives(DIM, config.objectives).eval()
    output = objectives(embeddings(), PAGE, HAS_TEXT, torch.Generator().manual_seed(0))
    expected = sum(result.weight * float(result.value) for result in output.components.values())
    assert float(output.total) == pytest.approx(expected, rel=1e-6)
    record = output.component_record()
    assert {name: item["weight"] for name, item in record.items()} == {
        "contrastive": 0.25, "reconstruction": 2.0, "alignment": 0.7,
    }
    assert {name: item["active"] for name, item in record.items()} == {
        "contrastive": 9, "reconstruction": 3, "alignment": 7,
    }


@torch.no_grad()
def test_weights_change_the_total():
    batch = embeddings()
    base = Objectives(DIM, ObjectivesConfig()).eval()
    heavier_config = ObjectivesConfig()
    heavier_config.weights.alignment = 3.0
    heavier = Objectives(DIM, heavier_config).eval()
    heavier.load_state_dict(base.state_dict())
    first = base(batch, PAGE, HAS_TEXT, torch.Generator().manual_seed(0))
    second = heavier(batch, PAGE, HAS_TEXT, torch.Generator().manual_seed(0))
    alignment = float(first.components["alignment"].value)
    assert float(second.total) - float(first.total) == pytest.approx((3.0 - 0.3) * alignment, rel=1e-5)


@torch.no_grad()
def test_alignment_temperature_overrides_shared_temperature():
    batch = embeddings()
    shared = Objectives(DIM, ObjectivesConfig(temperature=0.1)).eval()
    separate = Objectives(DIM, ObjectivesConfig(temperature=0.1, alignment_temperature=0.5)).eval()
    separate.load_state_dict(shared.state_dict())
    first = shared(batch, PAGE, HAS_TEXT, torch.Generator().manual_seed(0)).components
    second = separate(batch, PAGE, HAS_TEXT, torch.Generator().manual_seed(0)).components
    assert float(first["contrastive"].value) == pytest.approx(float(second["contrastive"].value))
    assert abs(float(first["alignment"].value) - float(second["alignment"].value)) > 1e-3
