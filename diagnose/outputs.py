"""Output files of the ``diagnose`` commands: checked before any work, written together at the end.

A regular file is written through a temporary file in its folder and a rename, so a reader (a browser,
a CI step) never opens a half-written file and a failed write leaves the previous file in place. When a
command writes several files, every temporary file is written before the first rename, so an error
while writing leaves none of the new files behind.

Other targets are written through, not replaced:

- ``-`` is standard output, and so is any path that names the file standard output is open on
  (``/dev/stdout``, or the file a shell redirects it to). It is written at the stream's position, so
  ``>>`` appends and earlier output is kept.
- A symbolic link keeps pointing where it did; the file it points to is replaced.
- A named pipe, a character device (``/dev/null``) or a process-substitution path such as
  ``/dev/fd/63`` is opened and written in place, because renaming over it would swap the device or
  pipe for a regular file.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from diagnose.io import InputError

STDOUT = "-"
# Characters of a file name kept in its temporary name, so that a name near the 255-byte limit still fits.
TEMPORARY_NAME_CHARS = 64


def is_stdout(target: str | Path | None) -> bool:
    """Return whether ``target`` is ``-`` or names the file that standard output is open on."""
    if target is None or str(target) == "":
        return False
    if str(target) == STDOUT:
        return True
    try:
        descriptor = sys.stdout.fileno()
        named, opened = os.stat(target), os.fstat(descriptor)
    except (AttributeError, OSError, ValueError):
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _is_special_file(path: Path) -> bool:
    """Return whether ``path`` (followed through symbolic links) exists and is not a regular file or folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _is_streamed(target: str | Path) -> bool:
    return is_stdout(target) or _is_special_file(Path(target))


def _replaced_path(path: Path) -> Path:
    """Return the regular file a write to ``path`` replaces: the final target of a symbolic link, or ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _temporary_prefix(destination: Path) -> str:
    return f".{destination.name[:TEMPORARY_NAME_CHARS]}."


def check_output_path(destination: Path, option: str) -> None:
    """Raise :class:`InputError` unless ``destination`` can be written: its folder exists and accepts a new file.

    Standard output and special files (pipes, devices) pass unopened, because opening a pipe blocks
    until a reader appears.
    """
    if _is_streamed(destination):
        return
    if destination.is_dir():
        raise InputError(f"{option} {destination}: is a directory")
    replaced = _replaced_path(destination)
    folder = replaced.parent
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{option} {destination}: {folder} is not a folder")
    if not folder.is_dir():
        raise InputError(f"{option} {destination}: folder {folder} does not exist")
    # Permission bits do not tell whether root may write (an immutable folder), so create a file.
    try:
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=_temporary_prefix(replaced), suffix=".tmp")
    except OSError as error:
        raise InputError(f"{option} {destination}: failed to create a file in {folder} ({error.strerror})") from None
    os.close(descriptor)
    Path(probe).unlink(missing_ok=True)


def check_distinct_outputs(outputs: dict[str, str | Path | None]) -> None:
    """Raise :class:`InputError` when two options name the same output (standard output counts too)."""
    seen: dict[str, str] = {}
    for option, target in outputs.items():
        if target is None or str(target) == "":
            continue
        key = STDOUT if is_stdout(target) else os.path.realpath(target)
        if key in seen:
            where = "standard output" if key == STDOUT else str(target)
            raise InputError(f"{seen[key]} and {option} both write to {where}; give each its own file")
        seen[key] = option


@dataclass
class _Output:
    text: str
    target: str
    option: str


class OutputFiles:
    """Collect a command's output texts and write them all at once with :meth:`write`."""

    def __init__(self) -> None:
        self._outputs: list[_Output] = []

    def add(self, text: str, target: str | Path | None, option: str) -> None:
        if target is None or str(target) == "":
            return
        self._outputs.append(_Output(text, str(target), option))

    def write(self) -> None:
        """Write every collected output.

        Regular files are written to temporaries first, then the streams (stdout, pipes, devices), and the
        temporaries are renamed into place last. So a failed write leaves no new file, though a stream
        written before the failure keeps what it received.
        """
        streamed = [output for output in self._outputs if _is_streamed(output.target)]
        regular = [output for output in self._outputs if output not in streamed]

        staged: list[tuple[Path, Path, _Output]] = []
        try:
            for output in regular:
                destination = _replaced_path(Path(output.target))
                staged.append((_write_temporary(output, destination), destination, output))
            for output in streamed:
                _write_through(output)
            for temporary, destination, output in staged:
                try:
                    os.replace(temporary, destination)
                except OSError as error:
                    raise _write_failed(output, error) from None
        finally:
            for temporary, _, _ in staged:
                temporary.unlink(missing_ok=True)
        self._outputs.clear()


def _write_failed(output: _Output, error: OSError) -> InputError:
    return InputError(f"{output.option} {output.target}: write failed ({error.strerror or error})")


def _write_temporary(output: _Output, destination: Path) -> Path:
    try:
        descriptor, name = tempfile.mkstemp(
            dir=destination.parent, prefix=_temporary_prefix(destination), suffix=".tmp"
        )
    except OSError as error:
        raise _write_failed(output, error) from None
    temporary = Path(name)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(output.text)
        # mkstemp creates the file readable by its owner only, so give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _write_failed(output, error) from None
    return temporary


def _write_through(output: _Output) -> None:
    try:
        if is_stdout(output.target):
            sys.stdout.write(output.text)
            sys.stdout.flush()
            return
        with open(output.target, "w", encoding="utf-8") as handle:
            handle.write(output.text)
    except OSError as error:
        raise _write_failed(output, error) from None


def write_text(text: str, target: str | Path, option: str) -> None:
    """Write one output (see the module docstring for how each kind of target is written)."""
    outputs = OutputFiles()
    outputs.add(text, target, option)
    outputs.write()
