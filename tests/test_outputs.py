"""Output files of the diagnose commands: symbolic links, pipes, stdout, and several outputs at once."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from diagnose.cli import main
from diagnose.io import InputError
from diagnose.outputs import OutputFiles, check_distinct_outputs, check_output_path, write_text

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "embeddings"
HEALTHY = FIXTURES / "healthy.safetensors"
RULES = Path(__file__).resolve().parents[1] / "configs" / "gate.toml"


def leftover_temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_regular_file_is_replaced(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_text("new", target, "--json")
    assert target.read_text() == "new"
    assert leftover_temporaries(tmp_path) == []


def test_new_file_gets_umask_permissions(tmp_path):
    target = tmp_path / "out.json"
    write_text("{}", target, "--json")
    reference = tmp_path / "reference"
    reference.write_text("")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_symbolic_link_keeps_pointing_at_its_target(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real.name)

    write_text("new", link, "--json")
    assert link.is_symlink()
    assert os.readlink(link) == real.name
    assert real.read_text() == "new"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_written_through(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()))
    reader.start()

    check_output_path(pipe, "--json")
    write_text("through the pipe", pipe, "--json")
    reader.join(timeout=30)
    assert received == ["through the pipe"]
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


def test_dash_writes_stdout(tmp_path, capsys):
    write_text("to stdout\n", "-", "--markdown")
    assert capsys.readouterr().out == "to stdout\n"
    assert list(tmp_path.iterdir()) == []


def test_failed_output_leaves_no_other_output(tmp_path):
    outputs = OutputFiles()
    outputs.add("first", tmp_path / "first.json", "--json")
    outputs.add("second", tmp_path / "missing" / "second.xml", "--junit")
    with pytest.raises(InputError, match="--junit") as raised:
        outputs.write()
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "first.json").exists()
    assert leftover_temporaries(tmp_path) == []


def test_check_rejects_file_as_folder(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(InputError, match="is not a folder"):
        check_output_path(blocker / "out.json", "--json")


def test_check_rejects_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out.json", "--json")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write in a read-only folder")
def test_check_rejects_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="failed to create a file in"):
            check_output_path(folder / "out.json", "--json")
    finally:
        folder.chmod(0o700)


def test_check_leaves_no_probe_file(tmp_path):
    check_output_path(tmp_path / "out.json", "--json")
    assert list(tmp_path.iterdir()) == []


def test_distinct_outputs_catch_same_file_through_link(tmp_path):
    real = tmp_path / "real.json"
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(InputError, match="-o and --json both write to"):
        check_distinct_outputs({"-o": real, "--json": link})


def test_distinct_outputs_catch_two_stdout_options():
    with pytest.raises(InputError, match="both write to standard output"):
        check_distinct_outputs({"--json": "-", "--markdown": "-"})
    check_distinct_outputs({"--json": "-", "--junit": None, "--markdown": "report.md"})


# --------------------------------------------------------------------------------------------------
# Command line


def run_cli(*arguments):
    return CliRunner().invoke(main, list(arguments))


def test_gate_markdown_to_stdout(tmp_path):
    result = run_cli("gate", str(HEALTHY), "--thresholds", str(RULES), "--markdown", "-")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("### diagnose gate: passed")
    assert not (Path.cwd() / "-").exists()


def test_gate_unwritable_output_writes_nothing(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    json_path = tmp_path / "gate.json"
    result = run_cli("gate", str(HEALTHY), "--thresholds", str(RULES), "--json", str(json_path),
                     "--junit", str(blocker / "gate.xml"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --junit")
    assert result.stderr.count("\n") == 1
    assert not json_path.exists()


def test_report_rejects_one_path_for_two_outputs(tmp_path):
    same = tmp_path / "same.out"
    result = run_cli("report", str(HEALTHY), "-o", str(same), "--json", str(same))
    assert result.exit_code == 2
    assert "-o and --json both write to" in result.stderr
    assert not same.exists()


def test_symbolic_link_loop_exits_2(tmp_path):
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    result = run_cli("collapse", str(tmp_path / "loop1"))
    assert result.exit_code == 2
    assert "loop1" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_broken_pipe_leaves_no_regular_output(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)

    def close_without_reading():
        with open(pipe, "rb"):
            pass

    reader = threading.Thread(target=close_without_reading)
    reader.start()
    outputs = OutputFiles()
    outputs.add("kept back", tmp_path / "report.json", "--json")
    # More than a pipe buffer holds, so the write is still blocked when the reader closes.
    outputs.add("x" * 4_000_000, pipe, "-o")
    with pytest.raises(InputError, match="-o .*write failed"):
        outputs.write()
    reader.join(timeout=30)
    assert not (tmp_path / "report.json").exists()
    assert leftover_temporaries(tmp_path) == []


def test_name_near_length_limit_is_written(tmp_path):
    target = tmp_path / ("a" * 250 + ".json")
    write_text("{}", target, "--json")
    assert target.read_text() == "{}"


@pytest.mark.skipif(not Path("/proc/self/fd/1").exists(), reason="needs /proc/self/fd")
def test_link_to_stdout_appends_to_redirected_file(tmp_path):
    import subprocess
    import sys

    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    captured = tmp_path / "captured.txt"
    captured.write_text("earlier line\n")
    with open(captured, "a") as stdout:
        completed = subprocess.run(
            [sys.executable, "-m", "diagnose", "collapse", str(HEALTHY), "--json", str(link)],
            stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300,
        )
    assert completed.returncode == 0, completed.stderr
    text = captured.read_text()
    assert text.startswith("earlier line\n{")
    assert '"schema": "collapse/1"' in text
    assert link.is_symlink()


def test_empty_output_name_exits_2():
    result = run_cli("collapse", str(HEALTHY), "--json", "")
    assert result.exit_code == 2
    assert "--json: empty file name" in result.stderr


def make_run_directory(root: Path) -> Path:
    (root / "embeddings").mkdir(parents=True)
    (root / "run.json").write_text("{}")
    for epoch in (1, 2):
        (root / "embeddings" / f"epoch_{epoch:04d}.safetensors").write_bytes(HEALTHY.read_bytes())
    return root


def test_output_over_sibling_epoch_file_exits_2(tmp_path):
    run = make_run_directory(tmp_path / "run")
    sibling = run / "embeddings" / "epoch_0001.safetensors"
    before = sibling.read_bytes()
    result = run_cli("collapse", str(run / "embeddings" / "epoch_0002.safetensors"), "--json", str(sibling))
    assert result.exit_code == 2
    assert "would overwrite an input" in result.stderr
    assert sibling.read_bytes() == before


def test_output_into_unrelated_run_exits_2(tmp_path):
    run = make_run_directory(tmp_path / "run")
    result = run_cli("collapse", str(HEALTHY), "--json", str(run / "run.json"))
    assert result.exit_code == 2
    assert "would overwrite a run artifact" in result.stderr
    assert (run / "run.json").read_text() == "{}"

    beside = tmp_path / "run" / "collapse.json"
    assert run_cli("collapse", str(HEALTHY), "--json", str(beside)).exit_code == 0
    assert beside.is_file()
