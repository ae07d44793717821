"""The three training objectives and their active counts.

``total = w_c * contrastive + w_r * reconstruction + w_a * alignment``. Each term reports how many
anchors, pages or pairs contributed to it in the batch (its ``active`` count). A term with nothing to
work on is an exact zero that stays connected to the graph, and its active count of 0 makes that
visible in the logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ObjectivesConfig
from trainer.model import PanelEmbeddings, projection_mlp

COMPONENTS = ("contrastive", "reconstruction", "alignment")


@dataclass
class ComponentResult:
    value: torch.Tensor
    weight: float
    # Contributing anchors (contrastive), pages (reconstruction) or image-text pairs (alignment).
    active: int


@dataclass
class ObjectiveOutput:
    total: torch.Tensor
    components: dict[str, ComponentResult]

    def component_record(self) -> dict[str, dict[str, float | int]]:
        """Return ``{name: {"value", "weight", "active"}}`` with plain Python numbers."""
        return {
            name: {"value": float(result.value.detach()), "weight": result.weight, "active": result.active}
            for name, result in self.components.items()
        }


def _zero(reference: torch.Tensor) -> torch.Tensor:
    # Multiplying keeps the zero on the graph, so backward() works when every term is empty.
    return reference.sum() * 0.0


def supervised_contrastive(z: torch.Tensor, page: torch.Tensor, temperature: float) -> tuple[torch.Tensor, int]:
    """Supervised-contrastive loss (Khosla et al., 2020, the L_out form) over all panels of a batch.

    Positives of an anchor are the other panels of its page, and self-pairs are excluded from both the
    positives and the softmax denominator. Anchors without a positive (single-panel pages) are left out
    of the mean. Returns ``(loss, anchors with at least one positive)``; the loss is 0 when that count is 0.
    """
    z = F.normalize(z.float(), dim=-1)
    count = z.shape[0]
    eye = torch.eye(count, dtype=torch.bool, device=z.device)
    positives = (page.unsqueeze(0) == page.unsqueeze(1)) & ~eye
    positive_counts = positives.sum(dim=1)
    anchors = positive_counts > 0
    active = int(anchors.sum())
    if active == 0:
        return _zero(z), 0

    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    log_prob = log_prob.masked_fill(eye, 0.0)
    mean_positive = (log_prob * positives).sum(dim=1)[anchors] / positive_counts[anchors]
    return -mean_positive.mean(), active


def choose_masked_panels(page: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one panel per page with at least 2 panels, uniformly at random.

    ``page`` contains each panel's page position with the panels of a page contiguous, as in
    :class:`trainer.data.PanelBatch`. The draw uses ``generator`` on the CPU (the global torch RNG
    when it is None). Returns ``(eligible pages, flat index of the chosen panel of each)``.
    """
    counts = torch.bincount(page.cpu())
    offsets = torch.cumsum(counts, dim=0) - counts
    draws = torch.rand(counts.shape[0], generator=generator)
    choice = torch.minimum((draws * counts).long(), (counts - 1).clamp(min=0))
    eligible = torch.nonzero(counts >= 2).flatten()
    return eligible.to(page.device), (offsets + choice)[eligible].to(page.device)


def masked_reconstruction(
    z: torch.Tensor,
    page: torch.Tensor,
    head: nn.Module,
    generator: torch.Generator | None,
    detach_target: bool = True,
    detach_context: bool = False,
) -> tuple[torch.Tensor, int]:
    """Predict one masked panel per page from the mean of the page's other panels; MSE.

    Only pages with at least 2 panels take part. With ``detach_target`` the target is a constant, so
    the model cannot lower the loss by moving target and context towards each other (the collapse
    shortcut). ``detach_context`` also stops the gradient through the context (an ablation).
    Returns ``(loss, pages that took part)``; the loss is 0 when no page has 2 panels.
    """
    eligible, targets = choose_masked_panels(page, generator)
    active = int(eligible.numel())
    if active == 0:
        return _zero(z), 0

    z = z.float()
    # Row e of `weights` averages page eligible[e] without its masked panel.
    weights = (page.unsqueeze(0) == eligible.unsqueeze(1)).float()
    weights[torch.arange(active, device=z.device), targets] = 0.0
    weights = weights / weights.sum(dim=1, keepdim=True)

    context = weights @ (z.detach() if detach_context else z)
    target = z[targets]
    if detach_target:
        target = target.detach()
    prediction = head(context).float()
    return F.mse_loss(prediction, target), active


def image_text_alignment(
    vision: torch.Tensor, text: torch.Tensor, has_text: torch.Tensor, temperature: float, symmetric: bool = True
) -> tuple[torch.Tensor, int]:
    """InfoNCE between image-only and text-only embeddings of the panels that have text.

    Panel i's text is the positive of panel i's image, and every other such panel in the batch is a
    negative. ``symmetric`` averages the image-to-text and text-to-image directions; otherwise only
    image-to-text counts. Returns ``(loss, image-text pairs)``; the loss is 0 with fewer than 2 pairs.
    """
    rows = torch.nonzero(has_text).flatten()
    active = int(rows.numel())
    if active < 2:
        return _zero(vision) + _zero(text), active

    vision = F.normalize(vision[rows].float(), dim=-1)
    text = F.normalize(text[rows].float(), dim=-1)
    logits = vision @ text.T / temperature
    labels = torch.arange(active, device=logits.device)
    image_to_text = F.cross_entropy(logits, labels)
    if not symmetric:
        return image_to_text, active
    text_to_image = F.cross_entropy(logits.T, labels)
    return (image_to_text + text_to_image) / 2, active


class Objectives(nn.Module):
    """The weighted training loss. The module contains the reconstruction head (Linear-GELU-Dropout-Linear)."""

    def __init__(self, dim: int, config: ObjectivesConfig):
        super().__init__()
        self.config = config
        self.reconstruction_head = projection_mlp(
            dim, config.reconstruction_hidden, dim, config.reconstruction_dropout
        )

    def forward(
        self,
        embeddings: PanelEmbeddings,
        page: torch.Tensor,
        has_text: torch.Tensor,
        generator: torch.Generator | None,
    ) -> ObjectiveOutput:
        config = self.config
        weights = config.weights
        alignment_temperature = config.alignment_temperature or config.temperature

        contrastive, contrastive_active = supervised_contrastive(embeddings.fused, page, config.temperature)
        reconstruction, reconstruction_active = masked_reconstruction(
            embeddings.fused,
            page,
            self.reconstruction_head,
            generator,
            detach_target=config.detach_target,
            detach_context=config.detach_context,
        )
        alignment, alignment_active = image_text_alignment(
            embeddings.vision, embeddings.text, has_text, alignment_temperature, symmetric=config.symmetric_alignment
        )

        components = {
            "contrastive": ComponentResult(contrastive, weights.contrastive, contrastive_active),
            "reconstruction": ComponentResult(reconstruction, weights.reconstruction, reconstruction_active),
            "alignment": ComponentResult(alignment, weights.alignment, alignment_active),
        }
        total = sum(result.weight * result.value for result in components.values())
        return ObjectiveOutput(total=total, components=components)
