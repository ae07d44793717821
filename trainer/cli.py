"""The ``trainer`` command: fit a run from a TOML config, resume it, or print the resolved config.

Exit status: 0 on success, 1 when training diverged, 2 for a bad config, dataset, run directory or
usage, with a one-line reason on stderr and no traceback. Training diverges when
``optim.max_bad_steps_in_a_row`` steps in a row have a NaN or infinite loss or gradient.

Under ``torchrun`` (``torchrun --nproc_per_node N -m trainer fit ...``) every rank runs the command;
rank 0 prints and writes the run, and errors of the other ranks name their rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from trainer.config import TrainerError, config_to_toml, load_config

# Kept low so that several runs or test jobs can share a small machine.
MAX_TORCH_THREADS = 2

SET_HELP = (
    "Override one config key, as KEY=VALUE with a dotted key (objectives.weights.alignment=0.5). "
    "VALUE is read as a TOML literal, else as a string. Repeatable; preset=legacy restores the historical "
    "training script."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train a multimodal panel encoder (image, text, layout) with contrastive objectives.

    A run directory receives run.json, metrics.jsonl (one record per optimiser step and per validation),
    the validation embeddings of every epoch and a checkpoint per epoch, which `diagnose` reads.
    """


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--out", "run_dir", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--overwrite", is_flag=True, help="Replace the artifacts of an earlier run in --out (keeps its feature cache).")
def fit(config_path: Path, run_dir: Path, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Train a new run from --config into --out."""
    config = load_config(config_path, overrides)
    loop, console = _prepare_training()
    run = loop.fit(config, run_dir, overwrite=overwrite, console=console)
    _report(run, run_dir)


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
def resume(run_dir: Path) -> None:
    """Continue RUN_DIR up to its configured number of epochs from checkpoints/last.pt, or from the
    newest epoch_NNNN.pt that loads (then best.pt) when last.pt is missing or damaged.

    Optimiser, scheduler, sampler and RNG states come from the checkpoint, and metrics.jsonl records
    written after it are dropped, so the finished run matches an uninterrupted one.
    """
    loop, console = _prepare_training()
    run = loop.resume(run_dir, console=console)
    _report(run, run_dir)


@cli.command("show-config")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def show_config(config_path: Path, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (file, presets and overrides applied) as TOML."""
    config = load_config(config_path, overrides)
    click.echo(config_to_toml(config), nl=False)


def _prepare_training():
    import torch
    from rich.console import Console

    from trainer import loop

    torch.set_num_threads(min(MAX_TORCH_THREADS, torch.get_num_threads()))
    return loop, Console(stderr=True)


def _report(run, run_dir: Path) -> None:
    # run.console prints nothing on the ranks after the first under torchrun.
    run.console.print(
        f"run {run_dir}: trained through epoch {run.epoch}, best validation loss {run.best_val_loss:.4f}, "
        f"checkpoints in {run.directory.checkpoints_dir}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command and turn errors into an exit status."""
    try:
        cli.main(args=argv, prog_name="trainer", standalone_mode=False)
    except click.exceptions.Exit as exit_request:
        sys.exit(exit_request.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("trainer: aborted", err=True)
        sys.exit(130)
    except TrainerError as error:
        rank = os.environ.get("RANK", "0") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "0"
        prefix = "trainer" if rank == "0" else f"trainer (rank {rank})"
        click.echo(f"{prefix}: error: {error}", err=True)
        sys.exit(error.exit_code)
    except OSError as error:
        # The run directory turns its own write errors into TrainerError. This catches the rest, for
        # example a feature cache folder that cannot be written.
        click.echo(f"trainer: error: {error}", err=True)
        sys.exit(TrainerError.exit_code)
    except RuntimeError as error:
        # pathlib of Python 3.11 raises RuntimeError for a loop of symbolic links.
        if not str(error).startswith("Symlink loop"):
            raise
        click.echo(f"trainer: error: {error}", err=True)
        sys.exit(TrainerError.exit_code)
    except KeyboardInterrupt:
        click.echo("trainer: interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
