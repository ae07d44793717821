"""The ``diagnose`` command line: parse, call the library, render.

Exit status: 0 the command ran (whatever the verdict), 1 a gate or ``--fail-on`` condition failed,
2 bad input or usage, with a one-line reason on stderr.

Heavy libraries (torch, faiss, umap, scikit-learn) are imported inside the commands that need them so
that ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path

import click

EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _stdout_console(*targets: str | Path | None):
    """Tables go to stdout, unless one of the output ``targets`` is standard output (``-`` or ``/dev/stdout``).

    A pipe or a CI log gets 160 columns rather than rich's default of 80, so that figures are not cut.
    """
    from rich.console import Console

    from diagnose.outputs import is_stdout

    to_stderr = any(is_stdout(target) for target in targets)
    console = Console(stderr=to_stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=to_stderr, width=160)
    return console


def handle_input_errors(command):
    """Turn input errors into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from diagnose.io import InputError

        try:
            return command(*args, **kwargs)
        except InputError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except (OSError, MemoryError) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except RuntimeError as error:
            # pathlib of Python 3.11 raises RuntimeError for a loop of symbolic links.
            if not str(error).startswith("Symlink loop"):
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper


def show_warnings(command):
    """Print library warnings as one 'warning:' line each on stderr, without source locations."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return command(*args, **kwargs)
            finally:
                seen = set()
                for warning in caught:
                    text = str(warning.message)
                    # Deprecation and resource warnings concern this code, not the user's input.
                    ignored = (DeprecationWarning, ResourceWarning)
                    if text not in seen and not issubclass(warning.category, ignored):
                        seen.add(text)
                        click.echo(f"warning: {text}", err=True)

    return wrapper


# Files and folders of a run directory that outputs must never replace.
RUN_ARTIFACTS = ("run.json", "metrics.jsonl", "embeddings", "checkpoints", "cache")


def check_outputs(outputs: dict, inputs: list) -> None:
    """Reject, before any work, output paths that would replace an input or cannot be written.

    An output may not be an input file, the page-id sidecar of an input file, anything inside an input
    Zarr store, or an artifact (run.json, metrics.jsonl, embeddings/, checkpoints/, cache/) of an input
    run directory, of the run an input file belongs to, or of any run directory at all. Its folder must
    exist and accept a new file, and no two options may name the same output. Standard output and unset
    outputs are not checked further, and an empty name is rejected.
    """
    from diagnose.io import InputError
    from diagnose.outputs import check_distinct_outputs, check_output_path, is_stdout

    check_distinct_outputs(outputs)

    protected_files = set()
    protected_trees = []
    for entry in inputs:
        if entry is None or str(entry) == "":
            continue
        path = Path(entry).resolve()
        if path.is_dir():
            if (path / ".zgroup").is_file() or (path / "zarr.json").is_file():
                protected_trees.append(path)
            else:
                protected_trees.extend(path / name for name in RUN_ARTIFACTS)
        else:
            protected_files.add(path)
            if path.suffix == ".safetensors":
                protected_files.add(path.with_name(path.name[: -len(".safetensors")] + ".pages.json"))
            # A checkpoint reads its epoch file from the folder above its own, wherever it lies, and an
            # epoch file or metrics.jsonl belongs to the run around it.
            if path.suffix == ".pt" or path.parent.name in RUN_ARTIFACTS:
                protected_trees.extend(path.parent.parent / name for name in RUN_ARTIFACTS)
            if path.name in RUN_ARTIFACTS:
                protected_trees.extend(path.parent / name for name in RUN_ARTIFACTS)

    for option, target in outputs.items():
        if target is None:
            continue
        if str(target) == "":
            raise InputError(f"{option}: empty file name; give a path, or - for standard output")
        destination = Path(target)
        check_output_path(destination, option)
        if is_stdout(target):
            continue
        resolved = destination.resolve()
        if resolved in protected_files or any(resolved == tree or tree in resolved.parents for tree in protected_trees):
            raise InputError(f"{option} {destination}: would overwrite an input; choose another output path")
        if _is_run_artifact(resolved):
            raise InputError(f"{option} {destination}: would overwrite a run artifact; choose another output path")


def _is_run_artifact(path: Path) -> bool:
    """Return whether ``path`` is, or lies inside, an artifact of a run directory (a folder with run.json)."""
    for folder in path.parents:
        if (folder / "run.json").is_file():
            relative = path.relative_to(folder)
            return relative.parts[0] in RUN_ARTIFACTS
    return False


def json_text(document: dict) -> str:
    return json.dumps(_finite_or_null(document), indent=2, allow_nan=False) + "\n"


def write_json(document: dict, target: str, option: str = "--json") -> None:
    """Write ``document`` to ``target`` (``-`` is stdout), as :func:`diagnose.outputs.write_text` writes files."""
    from diagnose.outputs import write_text

    write_text(json_text(document), target, option)


def _finite_or_null(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def _finite(context, parameter, value):
    """Reject NaN and infinite thresholds, which would make every comparison false."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="collapse-toolkit")
def main():
    """Measure representation collapse, retrieval and loss-signal sparsity of embedding runs.

    PATH arguments accept a run directory written by `trainer fit`, a checkpoint (checkpoints/*.pt), or an
    embedding file (.safetensors, .npz, .npy, .pt tensors, a Zarr store). Exit status: 0 ran, 1 a check
    failed, 2 bad input.
    """


# --------------------------------------------------------------------------------------------------
# collapse


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "json_target", metavar="FILE", help="Write the collapse/1 JSON document to FILE ('-' = stdout).")
@click.option("--modality", "modalities", multiple=True, metavar="NAME",
              help="Modality to measure (repeatable); default: every matrix in the file (fused, vision, text).")
@click.option("--last-only", is_flag=True, help="For a run directory, measure only the last epoch.")
@click.option("--data", "data_manifest", type=click.Path(path_type=Path), metavar="MANIFEST",
              help="For a checkpoint without its embedding file: dataset manifest CSV to re-embed.")
@click.option("--split", "data_split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="With --data: the pages to re-embed, by the checkpoint's validation split (val_fraction, seed).")
@click.option("--min-rank-ratio", default=0.1, show_default=True, type=click.FloatRange(0.0, 1.0), callback=_finite,
              help="dimensional_collapse below this effective_rank / min(N, D).")
@click.option("--complete-std-ratio", default=0.1, show_default=True, type=click.FloatRange(0.0, None), callback=_finite,
              help="complete_collapse below this std_l2 * sqrt(D).")
@click.option("--complete-mean-cosine", default=0.95, show_default=True, type=click.FloatRange(-1.0, 1.0), callback=_finite,
              help="complete_collapse above this mean pairwise cosine.")
@click.option("--group-intra-cosine", default=0.9, show_default=True, type=click.FloatRange(-1.0, 1.0), callback=_finite,
              help="group_collapse above this mean cosine between panels of one page.")
@click.option("--fail-on", type=click.Choice(["collapse", "never"]), default="never", show_default=True,
              help="'collapse': exit 1 when the verdict is not healthy.")
@click.option("--chunk-rows", default=32_768, show_default=True, type=click.IntRange(min=1),
              help="Rows read per chunk; memory is O(chunk x D + D^2).")
@click.option("--dask", "use_dask", is_flag=True,
              help="Compute a Zarr store's reductions with dask (the dask extra), block by block.")
@handle_input_errors
@show_warnings
def collapse(path, json_target, modalities, last_only, data_manifest, data_split, min_rank_ratio,
             complete_std_ratio, complete_mean_cosine, group_intra_cosine, fail_on, chunk_rows, use_dask):
    """Measure representation collapse of PATH: effective rank (RankMe), covariance spectrum, per-dimension
    spread (std_l2), pairwise cosines, uniformity, intra/inter-page cosine and the vision-text gap.

    Verdicts, checked in order: complete_collapse (std_l2 ratio or mean cosine past its bound),
    dimensional_collapse (effective rank ratio below its bound), group_collapse (panels of one page merge),
    else healthy. The verdict of the fused embedding is the overall verdict. A run directory is measured
    epoch by epoch, and the first collapsed epoch is reported.
    """
    check_outputs({"--json": json_target}, [path, data_manifest])
    from diagnose.collapse import VerdictThresholds
    from diagnose.documents import collapse_document
    from diagnose.io import CheckpointWithoutEmbeddings

    thresholds = VerdictThresholds(
        complete_std_ratio=complete_std_ratio,
        complete_mean_cosine=complete_mean_cosine,
        min_rank_ratio=min_rank_ratio,
        group_intra_cosine=group_intra_cosine,
    )
    console = _stdout_console(json_target)
    try:
        with ProgressBars("rows", enabled=_input_size(path) >= LARGE_INPUT_BYTES) as on_rows:
            document = collapse_document(
                path, modalities=list(modalities) or None, thresholds=thresholds, all_epochs=not last_only,
                chunk_rows=chunk_rows, on_rows=on_rows, use_dask=use_dask,
            )
    except CheckpointWithoutEmbeddings as missing:
        document = _checkpoint_without_embeddings(missing, data_manifest, data_split, thresholds, modalities)

    from diagnose.render import render_collapse

    render_collapse(document, console)
    if json_target:
        write_json(document, json_target)
    if fail_on == "collapse" and document.get("verdict") not in (None, "healthy"):
        sys.exit(EXIT_FAILED_CHECK)


def _checkpoint_without_embeddings(missing, data_manifest, data_split, thresholds, modalities) -> dict:
    from diagnose.documents import COLLAPSE_SCHEMA, measure_collapse, weight_diagnostics

    if data_manifest is not None:
        from diagnose.reembed import embed_checkpoint

        embedding_set = embed_checkpoint(missing.path, data_manifest, split=data_split)
        pages = len(embedding_set.page_ids or [])
        click.echo(f"note: re-embedded {pages} pages ({data_split} split) of {data_manifest}", err=True)
        measured = measure_collapse(embedding_set, modalities=list(modalities) or None, thresholds=thresholds)
        return {"schema": COLLAPSE_SCHEMA, "source": str(missing.path), **measured,
                "epoch": embedding_set.epoch, "epochs": None, "split": data_split}
    click.echo(
        f"note: {missing.path} has no embedding file next to it; showing weight-space diagnostics only. "
        "Pass --data MANIFEST to re-embed a dataset with this checkpoint.",
        err=True,
    )
    return {"schema": COLLAPSE_SCHEMA, "source": str(missing.path), "modalities": {}, "pairs": {},
            "verdict": None, "epochs": None, "weights": weight_diagnostics(missing.checkpoint)}


LARGE_INPUT_BYTES = 256 * 1024 * 1024


class ProgressBars:
    """Rich progress bars on stderr, one per label, with throughput in ``unit`` per second.

    Used as a context manager, it returns a callback ``(label, done, total)`` for the library's progress
    hooks, or ``None`` when disabled (small inputs, or no terminal).
    """

    def __init__(self, unit: str, enabled: bool = True):
        self.unit = unit
        self.enabled = enabled
        self.progress = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        if not (self.enabled and sys.stderr.isatty()):
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
        from rich.progress import TimeRemainingColumn
        from rich.text import Text

        unit = self.unit

        class SpeedColumn(ProgressColumn):
            def render(self, task):
                return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else "")

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SpeedColumn(),
            TimeRemainingColumn(), console=_stderr_console(), transient=True,
        )
        self.progress.start()
        return self.update

    def update(self, label: str, done: int, total: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=total)
        self.progress.update(self.tasks[label], completed=done)

    def __exit__(self, *exc_info):
        if self.progress is not None:
            self.progress.stop()
        return False


def _input_size(path: Path) -> int:
    """Return the bytes that a command reads from ``path``: a run directory's embeddings, not its checkpoints."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        folder = path / "embeddings" if (path / "embeddings").is_dir() else path
        return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())
    return 0


# --------------------------------------------------------------------------------------------------
# retrieval


def _parse_ks(context, parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        ks = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 1,5,10, got {value!r}") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"recall cut-offs must be positive integers, got {value!r}")
    return ks


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--query", default="vision", show_default=True, metavar="MODALITY",
              help="Modality whose rows are the queries (a matrix name in the file).")
@click.option("--gallery", default="text", show_default=True, metavar="MODALITY",
              help="Modality whose rows are searched.")
@click.option("--one-way", is_flag=True, help="Rank QUERY against GALLERY only, not also GALLERY against QUERY.")
@click.option("-k", "ks", callback=_parse_ks, metavar="K,K,...",
              help="Recall cut-offs to report in addition to recall@1, 5 and 10, e.g. 1,5,10,50.")
@click.option("--scope", type=click.Choice(["global", "page", "both"]), default="both", show_default=True,
              help="global: rank against the whole gallery. page: only against the query's own page.")
@click.option("--index", type=click.Choice(["flat", "hnsw", "ivf"]), default="flat", show_default=True,
              help="flat: exact search. ivf, hnsw: approximate FAISS search for galleries too large for "
                   "exact search, with the recall loss measured on a sample.")
@click.option("--depth", type=click.IntRange(min=1), metavar="N",
              help="Results per query kept by hnsw (and by ivf on a GPU). Default: max(100, largest K).")
@click.option("--nprobe", type=click.IntRange(min=1), metavar="N", help="ivf: inverted lists probed per query (default 16).")
@click.option("--sample", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Approximate search: sampled queries that are also ranked exactly, to measure the recall loss.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="auto: use a GPU when FAISS sees one.")
@click.option("--last-only", is_flag=True, help="For a run directory, measure only the last epoch.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Seed of the sampled queries and of IVF k-means.")
@click.option("--json", "json_target", metavar="FILE", help="Write the retrieval/1 JSON document to FILE ('-' = stdout).")
@handle_input_errors
@show_warnings
def retrieval(path, query, gallery, one_way, ks, scope, index, depth, nprobe, sample, device, last_only, seed,
              json_target):
    """Measure whether QUERY and GALLERY embeddings (default vision and text) still find each other.

    Every query is ranked by cosine similarity against the gallery. Its positives are the gallery rows
    with its pair id (item), and several per query are allowed. The rank is 1 + the gallery items scoring
    strictly above its best positive, plus the expected share of items tied with it, so a collapsed model
    scores at chance. Reports recall@K, MRR, median and mean rank and chance recall@1, over the whole
    gallery (global) and within the query's page (page), in both directions. Panels without text are left
    out. PATH is a run directory (every epoch, plus the full table of the last), a checkpoint or an
    embedding file. Exact search is tiled, so memory stays O(tile x gallery).
    """
    check_outputs({"--json": json_target}, [path])
    from diagnose.documents import retrieval_document
    from diagnose.render import render_retrieval

    scopes = ("global", "page") if scope == "both" else (scope,)
    index_params = {"nprobe": nprobe} if nprobe is not None else None
    with ProgressBars("queries", enabled=_stderr_console().is_terminal) as progress:
        document = retrieval_document(
            path, query=query, gallery=gallery, both_directions=not one_way, ks=ks, scopes=scopes, index=index,
            depth=depth, index_params=index_params, sample=sample, seed=seed, device=device,
            all_epochs=not last_only, progress=progress,
        )
    render_retrieval(document, _stdout_console(json_target))
    if json_target:
        write_json(document, json_target)


# --------------------------------------------------------------------------------------------------
# sparsity


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--batch-size", type=click.IntRange(min=1), metavar="PAGES",
              help="Pages per batch to predict for. Default: optim.batch_size of the run or of --config.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), metavar="TOML",
              help="Trainer config whose data settings (page filter, panel cap, split, sampler) apply. For a "
                   "run directory it replaces the config in run.json.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of --config or of the dataset's default config, as in `trainer fit --set`.")
@click.option("--sampler", type=click.Choice(["random", "balanced"]),
              help="Sampler to predict for. Default: data.sampler of the config.")
@click.option("--method", type=click.Choice(["auto", "exact", "simulate"]), default="auto", show_default=True,
              help="exact: closed form (random sampler only). simulate: run the trainer's sampler. "
                   "auto: exact for random, simulate for balanced.")
@click.option("--simulated-epochs", default=200, show_default=True, type=click.IntRange(min=2),
              help="Epochs the simulation draws; its standard error shrinks as 1 / sqrt(epochs).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Seed of the simulation.")
@click.option("--target", default=0.01, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Zero share that the suggested smallest batch size keeps every component under.")
@click.option("--max-zero-share", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="A component is starved when its zero share is above this.")
@click.option("--no-predict", is_flag=True, help="For a run directory, report the log only.")
@click.option("--fail-on", type=click.Choice(["starved", "never"]), default="never", show_default=True,
              help="'starved': exit 1 when a component is starved (observed, or predicted for a dataset).")
@click.option("--json", "json_target", metavar="FILE", help="Write the sparsity/1 JSON document to FILE ('-' = stdout).")
@handle_input_errors
@show_warnings
def sparsity(path, batch_size, config_path, overrides, sampler, method, simulated_epochs, seed, target,
             max_zero_share, no_predict, fail_on, json_target):
    """Measure how often each loss term had nothing to train on, or predict it from a dataset.

    A term gives no signal in a step when its active count is below its minimum: contrastive and
    reconstruction need a page with 2+ panels (active >= 1), alignment needs 2 panels with text
    (active >= 2). PATH is a run directory or its metrics.jsonl: per component, the share of steps without
    signal (zero share), the active-count distribution and the share of the weighted loss, overall and
    per epoch. When run.json names a readable dataset, the prediction is shown next to it.

    PATH may instead be a dataset, a manifest .csv or a trainer .toml config: the prediction only, from
    panels per page and text presence of the train split, with the trainer's page filter, panel cap and
    split. It gives each component's zero share and expected active count per step, and the smallest batch
    size that keeps every zero share under --target.
    """
    check_outputs({"--json": json_target}, [path, config_path])
    from diagnose.render import render_sparsity
    from diagnose.sparsity import PredictionRequest, sparsity_document

    request = None
    if not no_predict:
        request = PredictionRequest(
            batch_size=batch_size, config_path=config_path, overrides=tuple(overrides), sampler=sampler,
            method=method, epochs=simulated_epochs, seed=seed, target=target,
        )
    document = sparsity_document(path, request, threshold=max_zero_share)

    render_sparsity(document, _stdout_console(json_target))
    if json_target:
        write_json(document, json_target)
    starved = document["starved"] if document["components"] else (document["predicted"] or {}).get("starved", [])
    if fail_on == "starved" and starved:
        sys.exit(EXIT_FAILED_CHECK)


# --------------------------------------------------------------------------------------------------
# gate and baseline


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="PATH...")
@click.option("--thresholds", "rules_path", required=True, type=click.Path(path_type=Path), metavar="RULES.toml",
              help="TOML file of [[rule]] tables (configs/gate.toml is a ready set).")
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path), metavar="FILE",
              help="baseline/1 JSON written by `diagnose baseline`, for max_drop/max_rise bounds.")
@click.option("--epoch", type=click.IntRange(min=0), metavar="N",
              help="Epoch of the run directory to measure (default: the last).")
@click.option("--json", "json_target", metavar="FILE", help="Write the gate/1 JSON document to FILE ('-' = stdout).")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Write JUnit XML (one test case per rule) to FILE.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Write the result table as Markdown to FILE.")
@handle_input_errors
@show_warnings
def gate(paths, rules_path, baseline_path, epoch, json_target, junit_path, markdown_path):
    """Check the figures of a run against threshold rules, for CI: exit 0 when every rule passes, 1 when
    any fails, 2 for invalid rules or inputs.

    PATH is a run directory (or checkpoint, or embedding file), and/or JSON results of `diagnose collapse`,
    `retrieval` or `sparsity`. From a run directory only the documents the rules read are computed, for the
    last epoch unless --epoch is given. A JSON file given for a document is used as is.

    A rule fails when its metric is missing or not a finite number, and when it has a max_drop or max_rise
    bound but no --baseline is given. When GITHUB_STEP_SUMMARY is set, the Markdown table is appended to
    that file.
    """
    check_outputs({"--json": json_target, "--junit": junit_path, "--markdown": markdown_path,
                   "GITHUB_STEP_SUMMARY": os.environ.get("GITHUB_STEP_SUMMARY") or None},
                  [*paths, rules_path, baseline_path])
    from diagnose.gate import load_baseline, load_rules, run_gate
    from diagnose.gate_reports import append_step_summary, gate_junit, gate_markdown
    from diagnose.io import InputError
    from diagnose.outputs import OutputFiles
    from diagnose.render import render_gate

    rules = load_rules(rules_path)
    baseline = load_baseline(baseline_path) if baseline_path is not None else None
    document = run_gate(paths, rules, baseline=baseline, epoch=epoch)
    document["thresholds"] = str(rules_path)
    document["baseline_file"] = str(baseline_path) if baseline_path is not None else None

    render_gate(document, _stdout_console(json_target, junit_path, markdown_path))
    markdown = gate_markdown(document)
    outputs = OutputFiles()
    if json_target:
        outputs.add(json_text(document), json_target, "--json")
    if junit_path is not None:
        outputs.add(gate_junit(document), junit_path, "--junit")
    outputs.add(markdown, markdown_path, "--markdown")
    try:
        append_step_summary(markdown)
    except OSError as error:
        raise InputError(
            f"GITHUB_STEP_SUMMARY {os.environ.get('GITHUB_STEP_SUMMARY')}: write failed ({error.strerror or error})"
        ) from None
    outputs.write()
    if not document["passed"]:
        sys.exit(EXIT_FAILED_CHECK)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="PATH...")
@click.option("-o", "--output", "output", required=True, metavar="FILE",
              help="Where to write the baseline/1 JSON document ('-' = stdout).")
@click.option("--thresholds", "rules_path", type=click.Path(path_type=Path), metavar="RULES.toml",
              help="Record only the documents these rules read, and check that their metrics exist.")
@click.option("--epoch", type=click.IntRange(min=0), metavar="N",
              help="Epoch of the run directory to record (default: the last).")
@handle_input_errors
@show_warnings
def baseline(paths, output, rules_path, epoch):
    """Record the current figures of a run as the baseline that `diagnose gate --baseline` compares with.

    PATH is a run directory (or checkpoint, or embedding file) and/or JSON results of `diagnose collapse`,
    `retrieval` or `sparsity`. The baseline/1 file contains the whole documents, so later rules may read any
    metric of them.
    """
    check_outputs({"-o": output}, [*paths, rules_path])
    from diagnose.gate import build_baseline, load_rules

    rules = load_rules(rules_path) if rules_path is not None else None
    document = build_baseline(paths, rules=rules, epoch=epoch)
    if rules_path is not None:
        document["thresholds"] = str(rules_path)
    write_json(document, output, "-o")
    kinds = ", ".join(document["documents"])
    click.echo(f"baseline of {kinds} written to {'stdout' if output == '-' else output}", err=True)


# --------------------------------------------------------------------------------------------------
# report and compare


def _progress_line(message: str) -> None:
    click.echo(message, err=True)


def _terminal_progress_line(message: str) -> None:
    """Print a progress line only on a terminal, so that piped stderr keeps one line per error or warning."""
    if sys.stderr.isatty():
        click.echo(message, err=True)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Where to write the HTML report (one self-contained file).")
@click.option("--json", "json_target", metavar="FILE", help="Also write the report/1 JSON document to FILE ('-' = stdout).")
@click.option("--map", "map_method", type=click.Choice(["auto", "umap", "pca"]), default="auto", show_default=True,
              help="2-D map method; auto uses UMAP from 30 points on and PCA below.")
@click.option("--map-points", default=3000, show_default=True, type=click.IntRange(min=2),
              help="Most panels per map; larger epochs are drawn from a seeded sample. The modality map "
                   "draws each sampled panel up to three times (fused, vision, text).")
@click.option("--histogram-pairs", default=20_000, show_default=True, type=click.IntRange(min=1),
              help="Pairs of panels sampled (seeded) for each pairwise-cosine histogram.")
@click.option("--no-retrieval", is_flag=True,
              help="Skip vision/text retrieval, which ranks every panel against all others in every epoch.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Seed of every sample and of UMAP.")
@handle_input_errors
@show_warnings
def report(path, output, json_target, map_method, map_points, histogram_pairs, no_retrieval, seed):
    """Write a self-contained HTML report of PATH (a run directory, checkpoint or embedding file).

    The report holds the verdict and key figures of the first, best and last epochs; per-epoch
    trajectories of effective rank, std_l2 ratio, cosines, modality gap, recall@1/5 in both directions,
    loss components and their zero share; singular-value spectra; pairwise-cosine histograms; UMAP maps
    coloured by page and by modality (PCA below 30 points); and the loss-signal sparsity table. The best
    epoch has the lowest validation loss in metrics.jsonl, else it is the epoch of checkpoints/best.pt.
    The file has no script and no external address, so it opens offline.
    """
    check_outputs({"-o": output, "--json": json_target}, [path])
    from diagnose.outputs import OutputFiles
    from diagnose.render import render_report
    from diagnose.report import ReportOptions, build_report
    from diagnose.run_summary import summarize_run

    summary = summarize_run(path, retrieval=not no_retrieval, seed=seed, progress=_terminal_progress_line)
    options = ReportOptions(map_method=map_method, map_points=map_points, histogram_pairs=histogram_pairs, seed=seed)
    page, document = build_report(summary, options, progress=_progress_line)
    document["output"] = str(output)

    render_report(document, _stdout_console(output, json_target))
    outputs = OutputFiles()
    outputs.add(page, output, "-o")
    if json_target:
        outputs.add(json_text(document), json_target, "--json")
    outputs.write()
    where = "stdout" if str(output) == "-" else output
    click.echo(f"report written to {where} ({len(page.encode('utf-8')) / 1e6:.1f} MB)", err=True)


@main.command()
@click.argument("run_a", type=click.Path(path_type=Path), metavar="RUN_A")
@click.argument("run_b", type=click.Path(path_type=Path), metavar="RUN_B")
@click.option("--json", "json_target", metavar="FILE", help="Write the compare/1 JSON document to FILE ('-' = stdout).")
@click.option("--html", "html_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Write a self-contained HTML page with the trajectories of both runs overlaid.")
@click.option("--last-only", is_flag=True, help="Print only the last epochs in the terminal (the JSON has every epoch).")
@click.option("--no-retrieval", is_flag=True, help="Skip vision/text retrieval in both runs.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Seed of the sampled metrics.")
@handle_input_errors
@show_warnings
def compare(run_a, run_b, json_target, html_path, last_only, no_retrieval, seed):
    """Compare two runs epoch by epoch: every key figure of both, and the change B - A.

    RUN_A and RUN_B are run directories (or two checkpoints or embedding files, compared directly).
    Epochs are matched by number; an epoch present in one run only is listed with the other side
    empty. The last epochs (and the best epochs) of the two runs are also compared with each other.
    """
    check_outputs({"--json": json_target, "--html": html_path}, [run_a, run_b])
    from diagnose.compare import compare_html, compare_runs
    from diagnose.outputs import OutputFiles
    from diagnose.render import render_compare
    from diagnose.run_summary import summarize_run

    summary_a = summarize_run(run_a, retrieval=not no_retrieval, seed=seed)
    summary_b = summarize_run(run_b, retrieval=not no_retrieval, seed=seed)
    document = compare_runs(summary_a, summary_b)

    render_compare(document, _stdout_console(json_target, html_path), last_only=last_only)
    outputs = OutputFiles()
    if json_target:
        outputs.add(json_text(document), json_target, "--json")
    if html_path is not None:
        outputs.add(compare_html(document, summary_a, summary_b), html_path, "--html")
    outputs.write()
    if html_path is not None:
        where = "stdout" if str(html_path) == "-" else html_path
        click.echo(f"comparison written to {where}", err=True)


if __name__ == "__main__":
    main()
