"""The CI regression gate: threshold rules over the ``collapse/1``, ``retrieval/1`` and ``sparsity/1``
documents, optionally against a recorded baseline.

Rules live in a TOML file as ``[[rule]]`` tables::

    [[rule]]
    name = "fused embedding keeps its rank"
    metric = "collapse.modalities.fused.effective_rank_ratio"
    min = 0.2           # value >= min
    max_drop = 0.05     # baseline - value <= max_drop (needs --baseline)

Keys of a rule:

- ``metric`` (required): a dotted path into the documents, document name first. A key that itself
  contains a dot is matched whole, because at each level the longest key that fits the rest of the path
  is tried first, then shorter ones. A numeric segment indexes a list (``collapse.epochs.-1.verdict``).
- ``min`` / ``max``: inclusive bounds on the value.
- ``max_drop`` / ``max_drop_pct``: the largest allowed fall below the baseline value, absolute or in
  percent of ``|baseline|``. ``max_rise`` / ``max_rise_pct`` bound a rise above the baseline, for metrics
  where higher is worse (mean cosine, zero_share).
- ``equals``: the value must equal this string, number or boolean (for verdicts: ``equals = "healthy"``).
  It cannot be combined with the numeric bounds.
- ``name``, ``description``: printed in the reports.

The gate fails closed: a metric that is missing, null, NaN, infinite or not a number fails its rule with
that reason. A baseline bound without a baseline file also fails its rule (it is not skipped), so a CI job
that omits ``--baseline`` cannot pass by accident. Invalid rule files raise :class:`InputError`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

from diagnose.io import InputError, resolve_epochs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

GATE_SCHEMA = "gate/1"
BASELINE_SCHEMA = "baseline/1"
DOCUMENT_SCHEMAS = {"collapse/1": "collapse", "retrieval/1": "retrieval", "sparsity/1": "sparsity"}
DOCUMENT_KINDS = tuple(DOCUMENT_SCHEMAS.values())

NUMERIC_BOUNDS = ("min", "max", "max_drop", "max_drop_pct", "max_rise", "max_rise_pct")
BASELINE_BOUNDS = ("max_drop", "max_drop_pct", "max_rise", "max_rise_pct")
RULE_KEYS = ("metric", *NUMERIC_BOUNDS, "equals", "name", "description")


# --------------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]`` table; ``number`` is its 1-based position in the file."""

    number: int
    metric: str
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None
    max_drop_pct: float | None = None
    max_rise: float | None = None
    max_rise_pct: float | None = None
    equals: str | int | float | bool | None = None
    name: str | None = None
    description: str | None = None

    @property
    def document(self) -> str:
        """Name of the document the metric path starts with (``collapse``, ``retrieval``, ``sparsity``)."""
        return self.metric.split(".", 1)[0]

    @property
    def needs_baseline(self) -> bool:
        return any(getattr(self, bound) is not None for bound in BASELINE_BOUNDS)


def load_rules(path: str | Path) -> list[Rule]:
    """Read and validate a rules TOML file; raise :class:`InputError` naming the file and the rule."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a rules TOML file")
    if not path.is_file():
        raise InputError(f"{path}: no such rules file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: invalid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: rules file is not UTF-8 text ({error.reason} at byte {error.start})") from None
    return parse_rules(data, str(path))


def parse_rules(data: dict, source: str) -> list[Rule]:
    """Validate parsed TOML (``{"rule": [tables]}``) and return its rules in file order."""
    unknown = [key for key in data if key != "rule"]
    if unknown:
        raise InputError(f"{source}: unknown top-level key {unknown[0]!r}; rules go in [[rule]] tables")
    tables = data.get("rule")
    if tables is None:
        raise InputError(f"{source}: contains no [[rule]] tables")
    if not isinstance(tables, list):
        raise InputError(f"{source}: 'rule' must be an array of tables; write [[rule]], not [rule]")
    if not tables:
        raise InputError(f"{source}: contains no [[rule]] tables")
    return [_parse_rule(table, number, source) for number, table in enumerate(tables, start=1)]


def _parse_rule(table, number: int, source: str) -> Rule:
    where = f"{source}: rule {number}"
    if not isinstance(table, dict):
        raise InputError(f"{where}: must be a table")
    for key in table:
        if key not in RULE_KEYS:
            raise InputError(f"{where}: unknown key {key!r} (allowed: {', '.join(RULE_KEYS)})")

    metric = table.get("metric")
    if not isinstance(metric, str) or not metric.strip():
        raise InputError(f"{where}: needs a 'metric' string such as 'collapse.modalities.fused.effective_rank_ratio'")
    document, _, rest = metric.partition(".")
    if document not in DOCUMENT_KINDS or not rest:
        raise InputError(
            f"{where}: metric {metric!r} must start with a document name ({', '.join(DOCUMENT_KINDS)}) "
            "followed by a dotted path"
        )

    bounds = {}
    for key in NUMERIC_BOUNDS:
        if key not in table:
            continue
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{where}: {key!r} must be a finite number, got {value!r}")
        if key in BASELINE_BOUNDS and value < 0:
            raise InputError(f"{where}: {key!r} must be >= 0, got {value!r}")
        bounds[key] = float(value)
    if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
        raise InputError(f"{where}: min {bounds['min']:g} is above max {bounds['max']:g}")

    equals = table.get("equals")
    if equals is not None and not isinstance(equals, (str, int, float, bool)):
        raise InputError(f"{where}: 'equals' must be a string, number or boolean, got {type(equals).__name__}")
    if equals is not None and bounds:
        raise InputError(f"{where}: 'equals' cannot be combined with {', '.join(bounds)}; write two rules")
    if equals is None and not bounds:
        raise InputError(f"{where}: has no bound; give at least one of {', '.join(NUMERIC_BOUNDS)} or equals")

    texts = {}
    for key in ("name", "description"):
        if key in table and not isinstance(table[key], str):
            raise InputError(f"{where}: {key!r} must be a string")
        texts[key] = table.get(key)
    return Rule(number=number, metric=metric, equals=equals, **bounds, **texts)


# --------------------------------------------------------------------------------------------------
# Metric paths


class MetricNotFound(Exception):
    """A metric path that does not lead to a value; the message names the step where the path stopped."""


def lookup_metric(documents: dict[str, dict], metric: str):
    """Return the value at ``metric`` (document name first) in ``documents``.

    At each table, the keys that equal the rest of the path or are followed by a dot in it are tried
    longest first. So keys that contain dots (``recall@0.5``) or arrows (``vision->text``) are matched
    whole, and a shorter key is tried when the path does not continue under the longer one.
    Raises :class:`MetricNotFound` naming the step where the path stopped under the longest key tried.
    """
    document, _, rest = metric.partition(".")
    if document not in documents:
        raise MetricNotFound(f"no {document} document")
    return _walk(documents[document], rest, document)


def _walk(node, rest: str, walked: str):
    if not rest:
        return node
    if isinstance(node, list):
        key = rest.split(".", 1)[0]
        index = _list_index(key, len(node))
        if index is None:
            raise MetricNotFound(f"{walked} is a list of {len(node)}; {key!r} is not an index into it")
        return _walk(node[index], rest[len(key) + 1:], f"{walked}.{key}")
    if not isinstance(node, dict):
        raise MetricNotFound(f"{walked} is {_describe(node)}, not a table with key {rest!r}")

    keys = [key for key in node if isinstance(key, str) and (rest == key or rest.startswith(key + "."))]
    if not keys:
        missing_key = rest.split(".", 1)[0]
        raise MetricNotFound(f"{walked} has no key {missing_key!r} (keys: {_key_list(node)})")
    first_error = None
    for key in sorted(keys, key=len, reverse=True):
        try:
            return _walk(node[key], rest[len(key) + 1:], f"{walked}.{key}")
        except MetricNotFound as error:
            first_error = first_error or error
    raise first_error


def _list_index(text: str, length: int) -> int | None:
    try:
        index = int(text)
    except ValueError:
        return None
    return index if -length <= index < length else None


def _key_list(node: dict, limit: int = 8) -> str:
    keys = [str(key) for key in node]
    if not keys:
        return "none"
    listed = ", ".join(keys[:limit])
    return listed + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "infinite"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _finite_number_problem(value) -> str | None:
    """Why ``value`` is not a finite number, or ``None`` when it is one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {_describe(value)}, not a number"
    if not math.isfinite(value):
        return f"is {_describe(value)}"
    return None


# --------------------------------------------------------------------------------------------------
# Documents: JSON files, or built from a run directory


DocumentBuilder = Callable[[Path, int | None], dict]


def build_collapse_document(source: Path, epoch: int | None) -> dict:
    """Measure the ``collapse/1`` document of one epoch (default: the last) of a run, or of one file."""
    from diagnose.documents import collapse_document

    return _measure_epoch(collapse_document, source, epoch)


def build_retrieval_document(source: Path, epoch: int | None) -> dict:
    """Measure the ``retrieval/1`` document (vision and text, both directions) of one epoch or file."""
    from diagnose.documents import retrieval_document

    return _measure_epoch(retrieval_document, source, epoch)


def build_sparsity_document(source: Path, epoch: int | None) -> dict:
    """Summarise the ``sparsity/1`` document of a run's ``metrics.jsonl``: every step, or ``epoch``'s steps.

    The prediction is added when the run's config names a readable dataset, as in ``diagnose sparsity``.
    """
    from diagnose.sparsity import PredictionRequest, sparsity_document

    return sparsity_document(source, PredictionRequest(), epoch=epoch)


def _measure_epoch(measure: Callable[..., dict], source: Path, epoch: int | None) -> dict:
    chosen_epoch, embedding_path = select_epoch(source, epoch)
    document = measure(embedding_path, all_epochs=False)
    if chosen_epoch is not None:
        document["epoch"] = chosen_epoch
    return document


def select_epoch(source: Path, epoch: int | None) -> tuple[int | None, Path]:
    """Return ``(epoch, embedding file)`` for ``epoch`` of a run directory or checkpoint (default: the last)."""
    epochs = resolve_epochs(source)
    if epoch is None:
        return epochs[-1]
    for candidate, path in epochs:
        if candidate == epoch:
            return candidate, path
    known = [candidate for candidate, _ in epochs if candidate is not None]
    if not known:
        raise InputError(f"{source}: --epoch {epoch} needs a run directory or checkpoint; this input has no epochs")
    raise InputError(f"{source}: no epoch {epoch} (available: {', '.join(map(str, known))})")


# Builders compute a whole document from a run directory, checkpoint or embedding file. A kind mapped to
# None has no builder yet: rules on it fail unless its JSON file is passed.
DOCUMENT_BUILDERS: dict[str, DocumentBuilder | None] = {
    "collapse": build_collapse_document,
    "retrieval": build_retrieval_document,
    "sparsity": build_sparsity_document,
}


@dataclass
class DocumentSet:
    """The documents a gate run reads, where each came from, and why any needed one is unavailable."""

    documents: dict[str, dict] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def _schema_text(schema) -> str:
    return "no 'schema' key" if schema is None else f"'schema' is {schema!r}"


def read_document(path: Path) -> tuple[str, dict]:
    """Read a JSON result of ``diagnose collapse/retrieval/sparsity``; return its kind and the document."""
    document = _read_json(path)
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema not in DOCUMENT_SCHEMAS:
        known = ", ".join(DOCUMENT_SCHEMAS)
        raise InputError(f"{path}: {_schema_text(schema)}; expected one of {known}")
    return DOCUMENT_SCHEMAS[schema], document


def gather_documents(
    paths: Iterable[str | Path],
    kinds: Iterable[str],
    epoch: int | None = None,
    builders: dict[str, DocumentBuilder | None] | None = None,
) -> DocumentSet:
    """Collect the documents of ``kinds`` from JSON files and at most one run directory (or other input).

    A JSON file given for a kind is used as is; the other kinds are built from the run directory, and only
    those. A kind that cannot be obtained is listed in ``unavailable`` with the reason.
    """
    found, source = read_inputs(paths, epoch)
    build_documents(found, source, kinds, epoch, DOCUMENT_BUILDERS if builders is None else builders)
    return found


def read_inputs(paths: Iterable[str | Path], epoch: int | None) -> tuple[DocumentSet, Path | None]:
    """Read the JSON documents among ``paths``; return them and the one other input (run directory, file)."""
    found = DocumentSet()
    sources: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
        if path.is_file() and path.suffix.lower() == ".json":
            kind, document = read_document(path)
            if kind in found.documents:
                raise InputError(f"{path}: a second {kind} document (the first is {found.origins[kind]})")
            _check_document_epoch(path, document, epoch)
            found.documents[kind] = document
            found.origins[kind] = str(path)
        else:
            sources.append(path)
    if len(sources) > 1:
        raise InputError(
            f"{sources[1]}: give at most one run directory or embedding input (got {sources[0]} and {sources[1]})"
        )
    return found, (sources[0] if sources else None)


def build_documents(
    found: DocumentSet,
    source: Path | None,
    kinds: Iterable[str],
    epoch: int | None,
    builders: dict[str, DocumentBuilder | None],
) -> None:
    """Build each of ``kinds`` that ``found`` lacks from ``source``, or record in ``found`` why it cannot."""
    for kind in dict.fromkeys(kinds):
        if kind in found.documents:
            continue
        if source is None:
            found.unavailable[kind] = f"no {kind} document: pass its JSON file or a run directory"
            continue
        builder = builders.get(kind)
        if builder is None:
            found.unavailable[kind] = f"no builder for {kind} documents yet; pass its JSON file"
            continue
        found.documents[kind] = builder(source, epoch)
        found.origins[kind] = str(source)


def _check_document_epoch(path: Path, document: dict, epoch: int | None) -> None:
    recorded = document.get("epoch")
    if epoch is not None and isinstance(recorded, int) and recorded != epoch:
        raise InputError(f"{path}: document is of epoch {recorded}, but --epoch {epoch} was requested")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({_first_line(error)})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a diagnose document") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------------------------------
# Baselines


def build_baseline(
    paths: Iterable[str | Path],
    rules: list[Rule] | None = None,
    epoch: int | None = None,
    builders: dict[str, DocumentBuilder | None] | None = None,
) -> dict:
    """Record the current documents as a ``baseline/1`` document.

    With ``rules`` only the documents those rules read are recorded, and a rule with a baseline bound
    whose metric is missing or not a finite number raises :class:`InputError`, because every later gate
    run would fail on it. Without rules, every document that can be read or built is recorded. A kind
    whose builder rejects the input is then skipped with a warning, except ``collapse``, which raises.
    """
    paths = [Path(path) for path in paths]
    builders = DOCUMENT_BUILDERS if builders is None else builders
    if rules is not None:
        kinds = [rule.document for rule in rules]
        found = gather_documents(paths, kinds, epoch, builders)
        if found.unavailable:
            kind, reason = next(iter(found.unavailable.items()))
            raise InputError(f"cannot record the {kind} document the rules read: {reason}")
        found.documents = {kind: found.documents[kind] for kind in found.documents if kind in kinds}
        found.origins = {kind: found.origins[kind] for kind in found.documents}
    else:
        found = _gather_every_document(paths, epoch, builders)

    baseline = {
        "schema": BASELINE_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": [str(path) for path in paths],
        "epoch": epoch,
        "origins": found.origins,
        "documents": found.documents,
    }
    if rules is not None:
        baseline["metrics"] = _baseline_metrics(rules, found.documents)
    return baseline


def _gather_every_document(paths: list[Path], epoch: int | None, builders) -> DocumentSet:
    found, source = read_inputs(paths, epoch)
    for kind in DOCUMENT_KINDS:
        if kind in found.documents or source is None or builders.get(kind) is None:
            continue
        try:
            build_documents(found, source, [kind], epoch, builders)
        except InputError as error:
            if kind == "collapse":
                raise
            warnings.warn(f"{kind} document not recorded: {error}", stacklevel=2)
    if not found.documents:
        raise InputError("nothing to record: pass a run directory or JSON documents")
    return found


def _baseline_metrics(rules: list[Rule], documents: dict[str, dict]) -> dict:
    metrics = {}
    for rule in rules:
        try:
            value = lookup_metric(documents, rule.metric)
        except MetricNotFound as missing:
            value, problem = None, f"not found: {missing}"
        else:
            problem = None if rule.equals is not None else _finite_number_problem(value)
        if problem and rule.needs_baseline:
            raise InputError(f"rule {rule.number}: cannot record a baseline for {rule.metric}: value {problem}")
        metrics[rule.metric] = value if _is_scalar(value) else None
    return metrics


def load_baseline(path: str | Path) -> dict:
    """Read a ``baseline/1`` file and return its documents by kind."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a baseline JSON file")
    if not path.is_file():
        raise InputError(f"{path}: no such baseline file")
    baseline = _read_json(path)
    if not isinstance(baseline, dict) or baseline.get("schema") != BASELINE_SCHEMA:
        schema = baseline.get("schema") if isinstance(baseline, dict) else None
        raise InputError(
            f"{path}: {_schema_text(schema)}, not {BASELINE_SCHEMA!r}; record one with `diagnose baseline`"
        )
    documents = baseline.get("documents")
    if not isinstance(documents, dict):
        raise InputError(f"{path}: 'documents' must be a table of documents by kind")
    for kind, document in documents.items():
        expected = f"{kind}/1"
        if not isinstance(document, dict) or document.get("schema") != expected:
            raise InputError(f"{path}: documents.{kind} is not a {expected} document")
    return documents


# --------------------------------------------------------------------------------------------------
# Evaluation


def run_gate(
    paths: Iterable[str | Path],
    rules: list[Rule],
    baseline: dict[str, dict] | None = None,
    epoch: int | None = None,
    builders: dict[str, DocumentBuilder | None] | None = None,
) -> dict:
    """Gather the documents the rules read, check every rule, and return the ``gate/1`` document.

    ``baseline`` contains the baseline documents by kind, as :func:`load_baseline` returns them.
    """
    found = gather_documents(paths, [rule.document for rule in rules], epoch, builders)
    results = [evaluate_rule(rule, found, baseline) for rule in rules]
    return {
        "schema": GATE_SCHEMA,
        "passed": all(result["passed"] for result in results),
        "rules": results,
        "sources": found.origins,
        "epoch": epoch,
    }


def evaluate_rule(rule: Rule, found: DocumentSet, baseline: dict[str, dict] | None) -> dict:
    """Check one rule; return its result entry (``passed`` and a ``reason`` when it failed)."""
    result = {
        "number": rule.number,
        "name": rule.name,
        "description": rule.description,
        "metric": rule.metric,
        "value": None,
        "min": rule.min,
        "max": rule.max,
        "equals": rule.equals,
        "baseline": None,
        "max_drop": rule.max_drop,
        "max_drop_pct": rule.max_drop_pct,
        "max_rise": rule.max_rise,
        "max_rise_pct": rule.max_rise_pct,
        "delta": None,
        "delta_pct": None,
        "passed": False,
        "reason": None,
    }
    if rule.document in found.unavailable:
        result["reason"] = found.unavailable[rule.document]
        return result
    try:
        value = lookup_metric(found.documents, rule.metric)
    except MetricNotFound as missing:
        result["reason"] = f"metric not found: {missing}"
        return result
    result["value"] = value if _is_scalar(value) else None

    if rule.equals is not None:
        result["passed"] = _is_equal(value, rule.equals)
        if not result["passed"]:
            result["reason"] = f"value {describe_value(value)} is not {describe_value(rule.equals)}"
        return result

    problem = _finite_number_problem(value)
    if problem:
        result["reason"] = f"value {problem}"
        return result

    failures = _bound_failures(rule, value)
    failures += _baseline_failures(rule, value, baseline, result)
    result["passed"] = not failures
    result["reason"] = "; ".join(failures) or None
    return result


def _bound_failures(rule: Rule, value: float) -> list[str]:
    failures = []
    if rule.min is not None and value < rule.min:
        failures.append(f"{format_figure(value)} is below min {format_figure(rule.min)}")
    if rule.max is not None and value > rule.max:
        failures.append(f"{format_figure(value)} is above max {format_figure(rule.max)}")
    return failures


def _baseline_failures(rule: Rule, value: float, baseline: dict[str, dict] | None, result: dict) -> list[str]:
    """Compare with the baseline value; fill ``baseline``, ``delta`` and ``delta_pct`` of ``result``.

    ``delta_pct`` is the change in percent of ``|baseline|``. From a baseline of exactly 0 any change is
    an infinite percentage, so a percentage bound fails on any move in its direction.
    """
    if baseline is None:
        if rule.needs_baseline:
            return ["needs a baseline for its max_drop/max_rise bounds; pass --baseline FILE"]
        return []
    try:
        reference = lookup_metric(baseline, rule.metric)
    except MetricNotFound as missing:
        return [f"baseline metric not found: {missing}"] if rule.needs_baseline else []
    problem = _finite_number_problem(reference)
    if problem:
        return [f"baseline value {problem}"] if rule.needs_baseline else []

    delta = value - reference
    if reference != 0:
        delta_pct = 100.0 * delta / abs(reference)
    else:
        delta_pct = 0.0 if delta == 0 else math.copysign(math.inf, delta)
    result.update(baseline=reference, delta=delta, delta_pct=delta_pct)

    checks = (
        ("max_drop", -delta, "dropped {}"),
        ("max_drop_pct", -delta_pct, "dropped {}%"),
        ("max_rise", delta, "rose {}"),
        ("max_rise_pct", delta_pct, "rose {}%"),
    )
    failures = []
    for key, change, template in checks:
        bound = getattr(rule, key)
        if bound is not None and change > bound:
            failures.append(
                f"{template.format(format_figure(change))} from baseline {format_figure(reference)} ({key} {format_figure(bound)})"
            )
    return failures


def _is_equal(value, expected) -> bool:
    """Equality without Python's coercions: ``true`` does not equal ``1`` and ``"1"`` does not equal ``1``."""
    if _is_number(value) and _is_number(expected):
        return value == expected
    return type(value) is type(expected) and value == expected


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def describe_value(value) -> str:
    """Format a metric value or ``equals`` target for a message: strings quoted, numbers to six digits."""
    if isinstance(value, str):
        return repr(value)
    if _is_number(value):
        return format_figure(value)
    return _describe(value)


def format_figure(value: float) -> str:
    """Format a number to six significant digits (``inf`` and ``-inf`` for infinities)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


__all__ = [
    "BASELINE_SCHEMA",
    "DOCUMENT_BUILDERS",
    "GATE_SCHEMA",
    "Rule",
    "build_baseline",
    "describe_value",
    "format_figure",
    "gather_documents",
    "load_baseline",
    "load_rules",
    "lookup_metric",
    "run_gate",
]
