"""The panel encoder: vision, text and layout branches joined by a gated fusion that masks absent modalities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import ModelConfig, TrainerError
from trainer.data import LAYOUT_FEATURES, PanelBatch

# Frozen backbones of these names load their weights from an installed package, so checkpoints leave
# them out and rebuild them by name. Every other backbone is stored in full.
PACKAGED_BACKBONES = frozenset({"efficientnet_lite0", "minilm"})

VISION, TEXT, LAYOUT = 0, 1, 2


@dataclass
class PanelEmbeddings:
    """[panels, D] embeddings: the full fusion and the image-only and text-only fusions."""

    fused: torch.Tensor
    vision: torch.Tensor
    text: torch.Tensor


def projection_mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class GatedFusion(nn.Module):
    """Softmax gates over the modalities present in each row, then LayerNorm.

    An absent modality is zeroed before it enters the gate network and its gate logit is set to -inf,
    so it contributes nothing. Every row needs at least one present modality.
    """

    def __init__(self, dim: int, modalities: int = 3):
        super().__init__()
        self.gate = nn.Linear(modalities * dim, modalities)
        self.norm = nn.LayerNorm(dim)

    def forward(self, parts: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Fuse ``parts`` [rows, modalities, D] using the boolean mask ``present`` [rows, modalities]."""
        masked = parts * present.unsqueeze(-1).to(parts.dtype)
        logits = self.gate(masked.flatten(1)).float()
        logits = logits.masked_fill(~present, float("-inf"))
        gates = torch.softmax(logits, dim=-1).to(parts.dtype)
        fused = (gates.unsqueeze(-1) * masked).sum(dim=1)
        return self.norm(fused)


class PanelEncoder(nn.Module):
    """Map each panel to a D-dim embedding from its image, its text and 7 layout features.

    The vision and text branches are a backbone followed by a projection MLP to D; the layout branch is
    an MLP over the layout features. ``forward`` returns the fused embedding together with the
    image-only and text-only fusions, which share the projections and the fusion layer, so
    ``vision[i]`` and ``text[i]`` live in the same space as ``fused``.
    """

    def __init__(self, vision_backbone: nn.Module, text_backbone: nn.Module, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_backbone = vision_backbone
        self.text_backbone = text_backbone
        for backbone in (vision_backbone, text_backbone):
            if backbone.frozen:
                backbone.requires_grad_(False)
                backbone.eval()

        dim = config.dim
        self.vision_projection = projection_mlp(vision_backbone.out_dim, config.projection_hidden, dim, config.dropout)
        self.text_projection = projection_mlp(text_backbone.out_dim, config.projection_hidden, dim, config.dropout)
        self.layout_encoder = projection_mlp(LAYOUT_FEATURES, config.layout_hidden, dim, config.dropout)
        self.fusion = GatedFusion(dim)

    @property
    def dim(self) -> int:
        return self.config.dim

    def train(self, mode: bool = True) -> "PanelEncoder":
        super().train(mode)
        # Frozen backbones stay in eval mode so their BatchNorm statistics and dropout never change.
        for backbone in (self.vision_backbone, self.text_backbone):
            if backbone.frozen:
                backbone.eval()
        return self

    def backbone_features(self, batch: PanelBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return vision and text backbone features, from the batch's cache or by running the backbones."""
        if batch.vision_features is not None:
            vision = batch.vision_features
        else:
            vision = self.vision_backbone(batch.pixels)
        if batch.text_features is not None:
            text = batch.text_features
        else:
            text = self.text_backbone(batch.texts)
        return vision, text

    def project(self, batch: PanelBatch) -> torch.Tensor:
        """Return the per-modality projections stacked as [panels, 3, D] (vision, text, layout)."""
        vision_features, text_features = self.backbone_features(batch)
        device = batch.layout.device
        vision = self.vision_projection(vision_features.to(device))
        text = self.text_projection(text_features.to(device))
        layout = self.layout_encoder(batch.layout)
        return torch.stack([vision, text, layout.to(vision.dtype)], dim=1)

    def forward(self, batch: PanelBatch) -> PanelEmbeddings:
        parts = self.project(batch)
        return PanelEmbeddings(
            fused=self.fusion(parts, self._present(batch, fused=True)),
            vision=self.fusion(parts, self._present(batch, only=VISION)),
            text=self.fusion(parts, self._present(batch, only=TEXT)),
        )

    def embed_fused(self, batch: PanelBatch) -> torch.Tensor:
        return self.fusion(self.project(batch), self._present(batch, fused=True))

    def embed_vision_only(self, batch: PanelBatch) -> torch.Tensor:
        """Embed each panel from its image alone (no text, no layout)."""
        return self.fusion(self.project(batch), self._present(batch, only=VISION))

    def embed_text_only(self, batch: PanelBatch) -> torch.Tensor:
        """Embed each panel from its text alone.

        A panel without text gets the embedding of the empty string, so callers should select rows with
        ``batch.has_text``.
        """
        return self.fusion(self.project(batch), self._present(batch, only=TEXT))

    def _present(self, batch: PanelBatch, fused: bool = False, only: int | None = None) -> torch.Tensor:
        rows = batch.layout.shape[0]
        present = torch.zeros(rows, 3, dtype=torch.bool, device=batch.layout.device)
        if fused:
            present[:, VISION] = True
            present[:, TEXT] = batch.has_text
            present[:, LAYOUT] = True
        else:
            present[:, only] = True
        return present

    # ----------------------------------------------------------------------------------------------
    # Checkpoint state

    def excluded_state_prefixes(self) -> list[str]:
        """State-dict prefixes that checkpoints leave out: frozen backbones loaded from a package."""
        prefixes = []
        for prefix, name, frozen in (
            ("vision_backbone.", self.config.vision_backbone, self.vision_backbone.frozen),
            ("text_backbone.", self.config.text_backbone, self.text_backbone.frozen),
        ):
            if frozen and self.config.pretrained and name in PACKAGED_BACKBONES:
                prefixes.append(prefix)
        return prefixes

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        prefixes = tuple(self.excluded_state_prefixes())
        return {
            key: value for key, value in self.state_dict().items() if not (prefixes and key.startswith(prefixes))
        }

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``checkpoint_state_dict`` output; keys may be missing only under excluded prefixes.

        Raises TrainerError that lists the mismatch (tensor shapes, or missing and unexpected keys)
        before any weight is changed.
        """
        expected = self.state_dict()
        mismatched = [
            f"{key} has shape {list(value.shape)}, the model {list(expected[key].shape)}"
            for key, value in state.items()
            if key in expected and value.shape != expected[key].shape
        ]
        if mismatched:
            raise TrainerError(f"size mismatch: {'; '.join(mismatched[:5])}")
        prefixes = tuple(self.excluded_state_prefixes())
        missing = [key for key in expected if key not in state and not (prefixes and key.startswith(prefixes))]
        unexpected = [key for key in state if key not in expected]
        if missing or unexpected:
            raise TrainerError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        self.load_state_dict(state, strict=False)
