"""Loading ``.pt`` files with ``torch.load(weights_only=True)``, with one-line reasons for files that fail.

torch's own message for a rejected file is several paragraphs long and suggests loading it again with
``weights_only=False``, which runs any code the file contains. These reasons name what was rejected.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

# The first byte of a pickle of protocol 2 or later (the PROTO opcode).
PICKLE_PROTO_OPCODE = 0x80
# The first bytes of a zip archive's first local file header.
ZIP_MAGIC = b"PK\x03\x04"
# Fragments of the lines of torch's UnpicklingError message that give advice rather than the reason.
# torch 2.13 words the message differently for a blocked module, an unknown class and a bad opcode.
ADVICE_MARKERS = (
    "Weights only load failed", "Please file an issue", "Check the documentation", "set to `False`",
    "Alternatively, to load",
)
REASON_MARKER = "WeightsUnpickler error:"
NOT_TORCH_FILE = "not a PyTorch file (neither a zip archive nor a pickle of protocol 2 or later)"


class TorchFileError(ValueError):
    """A file that ``torch.load(weights_only=True)`` cannot load; the message is one line without the path."""


def load_weights_only(path: str | Path) -> Any:
    """Load ``path`` on the CPU with ``weights_only=True``; raise :class:`TorchFileError` for a file it rejects.

    An OSError that names a file (not found, permission denied) passes through. torch also raises
    OSError(22, "Invalid argument") without a file name for some truncated zip archives, which
    becomes a TorchFileError.
    """
    import torch

    path = Path(path)
    with warnings.catch_warnings():
        # torch warns about an unusual pickle protocol just before it rejects such a file.
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except OSError as error:
            if error.filename is not None:
                raise
            raise TorchFileError(f"not a readable PyTorch file (truncated or damaged: {error.strerror or error})") from None
        except pickle.UnpicklingError as error:
            raise TorchFileError(_rejection_reason(path, error)) from None
        except Exception as error:  # torch raises RuntimeError, EOFError and zip errors for damaged files
            if not _looks_like_torch_file(path):
                raise TorchFileError(NOT_TORCH_FILE) from None
            if zipfile.is_zipfile(path) and str(error).startswith("[enforce fail"):
                raise TorchFileError("not a PyTorch file (a zip archive without a PyTorch data.pkl record)") from None
            raise TorchFileError(f"not a readable PyTorch file ({_first_line(error)})") from None


def _rejection_reason(path: Path, error: pickle.UnpicklingError) -> str:
    if not _looks_like_torch_file(path):
        return NOT_TORCH_FILE
    detail = _specific_line(str(error))
    return (
        f"contains objects that weights_only loading rejects ({detail}); only tensors and plain "
        "containers are loaded, never arbitrary pickled objects"
    )


def _looks_like_torch_file(path: Path) -> bool:
    """Return whether ``path`` starts like a zip archive (even a truncated one) or a protocol 2+ pickle."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(len(ZIP_MAGIC))
    except OSError:
        return False
    return start == ZIP_MAGIC or start[:1] == bytes([PICKLE_PROTO_OPCODE])


def _specific_line(message: str) -> str:
    """Return the first sentence of torch's message that gives the reason, such as the rejected global."""
    for line in message.splitlines():
        if REASON_MARKER in line:
            line = line.split(REASON_MARKER, 1)[1]
        elif any(marker in line for marker in ADVICE_MARKERS):
            continue
        line = line.strip()
        if line:
            return line.split(". ")[0].rstrip(".")
    return "no reason given"


def _first_line(error: BaseException) -> str:
    """Return the first sentence of ``error``: torch appends paragraphs of advice to a damaged-file error."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")
