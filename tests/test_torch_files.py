"""Loading .pt files with weights_only=True: what loads, and the one-line reason for what does not."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch

from trainer.torch_files import TorchFileError, load_weights_only


class CanaryWriter:
    """Unpickling an instance runs os.system and creates the canary file."""

    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def test_tensors_and_plain_values_load(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"fused": torch.ones(2, 3), "epoch": 4, "names": ["a", "b"]}, path)
    loaded = load_weights_only(path)
    assert torch.equal(loaded["fused"], torch.ones(2, 3))
    assert loaded["epoch"] == 4
    assert loaded["names"] == ["a", "b"]


def test_code_in_pickle_never_runs(tmp_path):
    canary = tmp_path / "canary"
    path = tmp_path / "hostile.pt"
    torch.save({"fused": CanaryWriter(canary)}, path)

    with pytest.raises(TorchFileError) as raised:
        load_weights_only(path)
    message = str(raised.value)
    assert not canary.exists()
    assert message.startswith("contains objects that weights_only loading rejects")
    assert "system" in message
    assert "\n" not in message
    assert "False" not in message


def test_random_bytes_are_not_a_torch_file(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(7, 256)) * 4)
    with pytest.raises(TorchFileError, match=r"^not a PyTorch file \(neither a zip archive nor a pickle"):
        load_weights_only(path)


def test_text_file_is_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello world\n")
    with pytest.raises(TorchFileError, match=r"^not a PyTorch file \(neither a zip archive nor a pickle"):
        load_weights_only(path)


def test_zip_without_torch_record_is_named(tmp_path):
    import zipfile

    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    with pytest.raises(TorchFileError, match="a zip archive without a PyTorch data.pkl record"):
        load_weights_only(path)


def test_truncated_archive_is_torch_file_error(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.randn(64, 1024)}, path)
    data = path.read_bytes()
    for size in (len(data) // 8, len(data) // 2, len(data) - 100):
        path.write_bytes(data[:size])
        with pytest.raises(TorchFileError, match="^not a readable PyTorch file"):
            load_weights_only(path)


def test_protocol_4_pickle_is_rejected_without_warning(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TorchFileError, match="weights_only loading rejects"):
            load_weights_only(path)


def test_damaged_zip_names_first_sentence_only(tmp_path):
    path = tmp_path / "damaged.pt"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    with pytest.raises(TorchFileError) as raised:
        load_weights_only(path)
    message = str(raised.value)
    assert message.startswith("not a readable PyTorch file (")
    assert "\n" not in message
    assert ". " not in message


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_weights_only(tmp_path / "absent.pt")
