"""The run directory: ``run.json``, ``metrics.jsonl``, per-epoch embeddings and checkpoints.

Layout::

    RUN/run.json                              config, versions, device, seed, dataset fingerprint, skips
    RUN/metrics.jsonl                         one JSON object per optimiser step and per validation
    RUN/embeddings/epoch_NNNN.safetensors     validation embeddings of epoch NNNN
    RUN/embeddings/epoch_NNNN.pages.json      page ids, in the order of the ``page`` index
    RUN/checkpoints/epoch_NNNN.pt, last.pt, best.pt

Whole files are written to a temporary name in their folder, fsynced and renamed into place, so a
reader never sees a half-written file. ``metrics.jsonl`` is the exception: it is appended one line
at a time and flushed after every line, so a killed run can leave a torn last line, which a resumed
run removes together with the records written after its checkpoint.

Under torchrun only rank 0 writes: the other ranks hold a ``RunDirectory`` with ``writer=False``,
whose write methods do nothing.

The environment variable ``COLLAPSE_TOOLKIT_CRASH_IN_CHECKPOINT=N`` makes the process kill itself
with SIGKILL in the middle of writing the checkpoint of epoch N (after the temporary file is
written, before it is renamed). Tests use it to check that such a run resumes without loss.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainerError

RUN_FORMAT = "collapse-toolkit/run"
EMBEDDINGS_FORMAT = "collapse-toolkit/embeddings"
CHECKPOINT_FORMAT = "collapse-toolkit/checkpoint"
FORMAT_VERSION = 1
# The files a run writes, relative to its folder. --overwrite deletes only these and temporaries, so
# the feature cache and any other file in the folder are kept.
RUN_FILES = ("run.json", "metrics.jsonl")
EMBEDDINGS_FILES = re.compile(r"epoch_\d{4,}\.(safetensors|pages\.json)")
CHECKPOINT_FILES = re.compile(r"epoch_\d{4,}\.pt|last\.pt|best\.pt")
EPOCH_CHECKPOINT = re.compile(r"epoch_(\d{4,})\.pt")
# The feature cache folder may be all that a run left when it stopped before writing run.json.
CACHE_DIR_NAME = "cache"
CRASH_IN_CHECKPOINT_VARIABLE = "COLLAPSE_TOOLKIT_CRASH_IN_CHECKPOINT"

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    # Makes the rename durable. Some platforms and filesystems cannot open a directory for fsync.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_json(path: Path, payload: Any) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def embeddings_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.safetensors"


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


class RunDirectory:
    """Writes the artifacts of one training run; with ``writer=False`` every write method does nothing."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.embeddings_dir = self.path / "embeddings"
        self.checkpoints_dir = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.run_json_path = self.path / "run.json"
        self._metrics = None

    def check_writable(self, overwrite: bool) -> None:
        """Raise TrainerError unless the folder can take a new run.

        The folder must be creatable and writable, and empty unless ``overwrite`` is set. With
        ``overwrite``, a non-empty folder must contain a run of this trainer: a ``run.json`` whose
        ``format`` is ``collapse-toolkit/run``, or only the feature cache of a run that stopped
        before writing it. The folder is created and written to as a test, then left as it was.
        """
        if self.path.exists() and not self.path.is_dir():
            raise TrainerError(f"{self.path}: exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()):
            if not overwrite:
                raise TrainerError(f"{self.path}: run directory is not empty; pass --overwrite to replace its run")
            self._check_is_run()
        self._probe_write()

    def _check_is_run(self) -> None:
        if not self.run_json_path.is_file():
            if {entry.name for entry in self.path.iterdir()} <= {CACHE_DIR_NAME}:
                return
            raise TrainerError(
                f"{self.path}: not a run directory of this trainer (no run.json), so --overwrite "
                "will not delete anything in it. Choose an empty or new --out folder"
            )
        try:
            info = json.loads(self.run_json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TrainerError(
                f"{self.run_json_path}: cannot read run information ({error}), so --overwrite will not "
                "delete anything in this folder. Choose an empty or new --out folder"
            ) from None
        if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
            raise TrainerError(
                f"{self.path}: not a run directory of this trainer (run.json has no format={RUN_FORMAT!r}), "
                "so --overwrite will not delete anything in it. Choose an empty or new --out folder"
            )

    def _probe_write(self) -> None:
        """Create the folder and a temporary file in it, so a read-only or impossible path fails now.

        Folders that the probe creates are removed again, so a config or data error later in setup
        leaves no empty run directory behind.
        """
        if not self.writer:
            return
        created = [folder for folder in (self.path, *self.path.parents) if not folder.exists()]
        probe = self.path / f".write-probe.tmp-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise TrainerError(f"{self.path}: cannot create or write the run directory ({_reason(error)})") from None
        finally:
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def prepare(self, overwrite: bool) -> None:
        """Create the folders. With ``overwrite``, first delete the files of the previous run.

        Only the files listed in ``RUN_FILES``, ``EMBEDDINGS_FILES`` and ``CHECKPOINT_FILES`` and
        temporaries are deleted, so the feature cache and other files stay. Call ``check_writable``
        first, which checks that the folder contains a run of this trainer.
        """
        if not self.writer:
            return
        with _write_errors(self.path):
            if overwrite:
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
                _delete_matching(self.embeddings_dir, EMBEDDINGS_FILES)
                _delete_matching(self.checkpoints_dir, CHECKPOINT_FILES)
                self.remove_stale_temporaries()
            self.embeddings_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------------------------
    # run.json and metrics.jsonl

    def write_run_info(self, info: dict[str, Any]) -> None:
        if self.writer:
            with _write_errors(self.run_json_path):
                write_json(self.run_json_path, info)

    def read_run_info(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise TrainerError(f"{self.run_json_path}: cannot read run information ({error})") from None

    def open_metrics(self, keep_through_epoch: int | None = None, keep_through_step: int | None = None) -> None:
        """Open ``metrics.jsonl`` for appending.

        A resumed run passes its checkpoint's epoch and step. Records of later epochs or later steps,
        written after that checkpoint, are dropped first, so that no step appears twice, and so is a
        line that is not a JSON object (the torn last line of a killed run).
        """
        if not self.writer:
            return
        with _write_errors(self.metrics_path):
            self._open_metrics(keep_through_epoch, keep_through_step)

    def _open_metrics(self, keep_through_epoch: int | None, keep_through_step: int | None) -> None:
        if keep_through_epoch is not None and self.metrics_path.exists():
            kept_lines = []
            dropped = 0
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                if _keeps_record(line, keep_through_epoch, keep_through_step):
                    kept_lines.append(line)
                else:
                    dropped += 1
            if dropped:
                log.info("%s: dropped %d records written after the checkpoint", self.metrics_path, dropped)
            with atomic_write(self.metrics_path) as temporary:
                temporary.write_text("".join(line + "\n" for line in kept_lines), encoding="utf-8")
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with _write_errors(self.metrics_path, self.path):
            self._metrics.write(json.dumps(record, allow_nan=True) + "\n")
            self._metrics.flush()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files that a killed run left in the run folder; return their paths.

        Only the run's own folders are cleaned. The feature cache may be shared with runs that are
        writing right now.
        """
        if not self.writer:
            return []
        removed = []
        for folder in (self.path, self.embeddings_dir, self.checkpoints_dir):
            if not folder.is_dir():
                continue
            stale_files = list(folder.glob(".*.tmp-*"))
            if folder == self.embeddings_dir:
                # safetensors writes its own temporary file, named .tmpXXXXXX, before renaming it.
                stale_files.extend(folder.glob(".tmp*"))
            for stale in stale_files:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
                    removed.append(stale)
        return removed

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    # ----------------------------------------------------------------------------------------------
    # Embeddings and checkpoints

    def write_embeddings(
        self,
        epoch: int,
        fused: torch.Tensor,
        vision: torch.Tensor,
        text: torch.Tensor,
        page: torch.Tensor,
        has_text: torch.Tensor,
        page_ids: list[str],
        split: str = "val",
    ) -> str:
        """Write one epoch's embeddings and page-id sidecar; return the file's path relative to the run."""
        name = embeddings_name(epoch)
        if not self.writer:
            return f"embeddings/{name}"
        tensors = {
            "fused": fused.detach().float().cpu().contiguous(),
            "vision": vision.detach().float().cpu().contiguous(),
            "text": text.detach().float().cpu().contiguous(),
            "page": page.detach().to(torch.int64).cpu().contiguous(),
            "item": torch.arange(fused.shape[0], dtype=torch.int64),
            "has_text": has_text.detach().to(torch.uint8).cpu().contiguous(),
        }
        metadata = {"format": EMBEDDINGS_FORMAT, "version": str(FORMAT_VERSION), "epoch": str(epoch), "split": split}
        with _write_errors(self.embeddings_dir / name, self.path):
            with atomic_write(self.embeddings_dir / name) as temporary:
                save_safetensors(tensors, temporary, metadata=metadata)
            write_json(self.embeddings_dir / name.replace(".safetensors", ".pages.json"), page_ids)
        return f"embeddings/{name}"

    def save_checkpoint(self, checkpoint: dict[str, Any], is_best: bool, keep_last: int = 0) -> Path:
        """Write ``epoch_NNNN.pt`` and ``last.pt``, and ``best.pt`` when ``is_best``; return the epoch file.

        With ``keep_last`` > 0 only the newest ``keep_last`` epoch files remain afterwards.
        """
        epoch = int(checkpoint["epoch"])
        epoch_path = self.checkpoints_dir / checkpoint_name(epoch)
        if not self.writer:
            return epoch_path
        with _write_errors(epoch_path, self.path):
            with atomic_write(epoch_path) as temporary:
                save_torch(checkpoint, temporary)
                if os.environ.get(CRASH_IN_CHECKPOINT_VARIABLE) == str(checkpoint["epoch"]):
                    os.kill(os.getpid(), signal.SIGKILL)
            targets = ["last.pt"] + (["best.pt"] if is_best else [])
            for name in targets:
                _link_or_copy(epoch_path, self.checkpoints_dir / name)
        if keep_last > 0:
            self._delete_epoch_checkpoints_before(epoch - keep_last + 1)
        return epoch_path

    def resume_candidates(self) -> list[Path]:
        """Return the checkpoint files that a resume may start from, newest first.

        ``last.pt`` comes first, then the ``epoch_NNNN.pt`` files by descending epoch, then ``best.pt``,
        which may be older than every epoch file but is all that is left when they are deleted. Only
        existing files are listed, and none of them is opened.
        """
        candidates = []
        last = self.checkpoints_dir / "last.pt"
        if last.is_file():
            candidates.append(last)
        epochs = []
        if self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.iterdir():
                match = EPOCH_CHECKPOINT.fullmatch(path.name)
                if match and path.is_file():
                    epochs.append((int(match.group(1)), path))
        candidates.extend(path for _, path in sorted(epochs, reverse=True))
        best = self.checkpoints_dir / "best.pt"
        if best.is_file():
            candidates.append(best)
        return candidates

    def point_last_at(self, source: Path) -> None:
        """Replace ``last.pt`` with ``source``'s content, so a damaged ``last.pt`` is not kept."""
        if not self.writer:
            return
        last = self.checkpoints_dir / "last.pt"
        with _write_errors(last, self.path):
            _link_or_copy(source, last)

    def _delete_epoch_checkpoints_before(self, first_kept: int) -> None:
        for path in self.checkpoints_dir.glob("epoch_*.pt"):
            match = EPOCH_CHECKPOINT.fullmatch(path.name)
            if match and int(match.group(1)) < first_kept:
                # A file that cannot be deleted costs disk space, not correctness.
                try:
                    path.unlink()
                except OSError as error:
                    log.warning("failed to delete old checkpoint %s (%s)", path, _reason(error))


class _RecordingFile:
    """A binary file wrapper that keeps the OSError of a failed write.

    ``torch.save`` (2.13) reports a failed write, such as a full disk, as a RuntimeError from its zip
    writer ("enforce fail at inline_container.cc ... unexpected pos") that does not give the cause.
    """

    def __init__(self, handle):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_torch(payload: Any, path: Path) -> None:
    """Write ``payload`` with ``torch.save``. A failed write raises its OSError instead of torch's RuntimeError."""
    with open(path, "wb") as handle:
        recorder = _RecordingFile(handle)
        try:
            torch.save(payload, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file with the mode of a newly created file (0o666 less the umask).

    A failed write raises OSError instead of SafetensorError.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        # The message ends with the OS error, such as "I/O error: No space left on device (os error 28)".
        raise OSError(None, str(error).strip().splitlines()[0]) from None
    # save_file (safetensors 0.8.0) creates a temporary file with mode 0o600 and renames it onto path.
    os.chmod(path, 0o666 & ~_current_umask())


def _current_umask() -> int:
    # os.umask can only be read by setting it, so it is set back at once. A file that another thread
    # creates between the two calls gets the common default umask 0o022 instead of this process's.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _write_errors(path: Path, run_dir: Path | None = None) -> Iterator[None]:
    """Turn an OSError (permission denied, disk full, read-only filesystem) into a one-line TrainerError.

    With ``run_dir`` (writes during training) the message adds the command that continues the run.
    """
    try:
        yield
    except OSError as error:
        target = error.filename or path
        message = f"{target}: cannot write run artifact ({_reason(error)})"
        if run_dir is not None:
            message += f". After fixing that, 'trainer resume {run_dir}' continues from the last checkpoint"
        raise TrainerError(message) from None


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _delete_matching(folder: Path, pattern: re.Pattern[str]) -> None:
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if pattern.fullmatch(entry.name) and not entry.is_dir():
            entry.unlink(missing_ok=True)


def _keeps_record(line: str, last_epoch: int, last_step: int | None) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    if not isinstance(record, dict):
        return False
    if int(record.get("epoch", 0)) > last_epoch:
        return False
    return last_step is None or int(record.get("step", 0)) <= last_step


def _link_or_copy(source: Path, target: Path) -> None:
    """Point ``target`` at ``source``'s content: a hard link renamed into place, or an atomic copy.

    A later checkpoint replaces ``last.pt`` by renaming over it, so a linked epoch file never changes.
    """
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    try:
        os.link(source, temporary)
    except OSError:
        with atomic_write(target) as copy_target:
            shutil.copyfile(source, copy_target)
        return
    os.replace(temporary, target)
    _fsync_directory(target.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a trainer checkpoint with ``weights_only=True``; raise TrainerError if it is not one."""
    from trainer.torch_files import TorchFileError, load_weights_only

    path = Path(path)
    try:
        checkpoint = load_weights_only(path)
    except FileNotFoundError:
        raise TrainerError(f"{path}: checkpoint not found") from None
    except (TorchFileError, OSError) as error:
        raise TrainerError(f"{path}: cannot load checkpoint: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainerError(f"{path}: not a collapse-toolkit checkpoint (no format={CHECKPOINT_FORMAT!r} key)")
    if checkpoint.get("version") != FORMAT_VERSION:
        raise TrainerError(f"{path}: checkpoint version {checkpoint.get('version')!r} is not supported")
    problem = _checkpoint_problem(checkpoint)
    if problem is not None:
        raise TrainerError(f"{path}: invalid checkpoint: {problem}")
    return checkpoint


# The keys that trainer.loop.save_checkpoint writes and a resume reads, with their expected types.
# An int field excludes bool, and a number field accepts int or float.
REQUIRED_CHECKPOINT_KEYS: dict[str, str] = {
    "config": "dict",
    "epoch": "int",
    "step": "int",
    "model_state_dict": "state_dict",
    "objectives_state_dict": "state_dict",
    "optimizer_state_dict": "dict",
    "scheduler_state_dict": "dict",
    "rng_state": "dict",
    "best_val_loss": "number",
}
OPTIONAL_CHECKPOINT_KEYS: dict[str, str] = {
    "sampler_state_dict": "dict",
    "rank_rng_states": "list",
    "skipped_steps": "int",
    "bad_steps_in_a_row": "int",
}


def _checkpoint_problem(checkpoint: dict[str, Any]) -> str | None:
    """Describe the first missing or wrongly typed checkpoint key, or return None when all are valid."""
    for key, kind in REQUIRED_CHECKPOINT_KEYS.items():
        if key not in checkpoint:
            return f"missing key {key!r}"
        problem = _value_problem(key, checkpoint[key], kind)
        if problem is not None:
            return problem
    for key, kind in OPTIONAL_CHECKPOINT_KEYS.items():
        if key in checkpoint:
            problem = _value_problem(key, checkpoint[key], kind)
            if problem is not None:
                return problem
    if checkpoint["epoch"] < 1:
        return f"'epoch' is {checkpoint['epoch']}, expected 1 or more"
    if checkpoint["step"] < 0:
        return f"'step' is {checkpoint['step']}, expected 0 or more"
    return None


def _value_problem(key: str, value: Any, kind: str) -> str | None:
    if kind == "int":
        valid = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif kind == "number":
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
    elif kind == "list":
        valid = isinstance(value, list)
        expected = "a list"
    elif kind == "state_dict":
        valid = isinstance(value, dict) and all(
            isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in value.items()
        )
        expected = "a dict of tensors"
    else:
        valid = isinstance(value, dict)
        expected = "a dict"
    if valid:
        return None
    return f"{key!r} is {type(value).__name__} {_short_repr(value)}, expected {expected}"


def _short_repr(value: Any) -> str:
    # Containers may hold whole tensors, so they are described by size instead of printed.
    if isinstance(value, torch.Tensor):
        return f"of shape {list(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"of length {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
