"""The CI gate: rule files, metric paths, baselines, reports and exit status."""

import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from diagnose.cli import main
from diagnose.gate import (
    DocumentSet,
    MetricNotFound,
    Rule,
    evaluate_rule,
    gather_documents,
    lookup_metric,
    parse_rules,
)
from diagnose.io import InputError

RANK_RATIO = "collapse.modalities.fused.effective_rank_ratio"
COSINE_MEAN = "collapse.modalities.fused.cosine.mean"


def collapse_document(rank_ratio=0.6, cosine_mean=0.2, verdict="healthy", epoch=None):
    return {
        "schema": "collapse/1",
        "source": "constructed",
        "modalities": {
            "fused": {
                "effective_rank_ratio": rank_ratio,
                "std_l2_ratio": 0.8,
                "cosine": {"mean": cosine_mean, "std": 0.1},
                "verdict": verdict,
            }
        },
        "pairs": {},
        "verdict": verdict,
        "epoch": epoch,
        "epochs": None,
    }


def retrieval_document(recall_at_5=0.7):
    metrics = {"n_queries": 40, "gallery_size": 40, "recall@1": 0.3, "recall@5": recall_at_5, "recall@10": 0.9,
               "mrr": 0.45, "median_rank": 2.0, "mean_rank": 4.0, "chance@1": 0.025}
    return {"schema": "retrieval/1", "source": "constructed",
            "directions": {"vision->text": {"global": metrics, "page": None}}}


def write_json_file(path, document):
    # json.dumps writes NaN and Infinity literals, which json.loads reads back as floats.
    path.write_text(json.dumps(document))
    return path


def write_rules(tmp_path, text, name="rules.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(arg) for arg in args], env=env)


def gate_json(tmp_path, *args):
    """Run the gate with --json and return (result, gate/1 document)."""
    output = tmp_path / "gate.json"
    result = invoke("gate", *args, "--json", output)
    document = json.loads(output.read_text()) if output.exists() else None
    return result, document


def assert_input_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


TWO_RULES = f"""
[[rule]]
name = "fused rank"
metric = "{RANK_RATIO}"
min = 0.3

[[rule]]
metric = "{COSINE_MEAN}"
max = 0.5
"""


# --------------------------------------------------------------------------------------------------
# Pass, fail, fail closed


def test_passing_rules_exit_0(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES)

    result, gate = gate_json(tmp_path, document_path, "--thresholds", rules)

    assert result.exit_code == 0, result.output
    assert gate["schema"] == "gate/1"
    assert gate["passed"] is True
    assert len(gate["rules"]) == 2
    first = gate["rules"][0]
    for key in ("metric", "value", "min", "max", "baseline", "max_drop", "passed", "reason"):
        assert key in first
    assert first["metric"] == RANK_RATIO
    assert first["value"] == 0.6
    assert first["min"] == 0.3
    assert first["name"] == "fused rank"
    assert first["passed"] is True
    assert first["reason"] is None


def test_failing_rule_exit_1(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document(rank_ratio=0.05))
    rules = write_rules(tmp_path, TWO_RULES)

    result, gate = gate_json(tmp_path, document_path, "--thresholds", rules)

    assert result.exit_code == 1, result.output
    assert gate["passed"] is False
    assert gate["rules"][0]["passed"] is False
    assert gate["rules"][0]["reason"] == "0.05 is below min 0.3"
    assert gate["rules"][1]["passed"] is True
    assert "fused rank" in result.output
    assert "below min 0.3" in result.output


def test_value_above_max_fails(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document(cosine_mean=0.97))
    rules = write_rules(tmp_path, TWO_RULES)

    result, gate = gate_json(tmp_path, document_path, "--thresholds", rules)

    assert result.exit_code == 1
    assert gate["rules"][1]["reason"] == "0.97 is above max 0.5"


def test_bounds_are_inclusive(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document(rank_ratio=0.3, cosine_mean=0.5))
    rules = write_rules(tmp_path, TWO_RULES)

    result = invoke("gate", document_path, "--thresholds", rules)

    assert result.exit_code == 0, result.output


def test_missing_metric_fails_closed(tmp_path):
    document = collapse_document()
    del document["modalities"]["fused"]["cosine"]
    document_path = write_json_file(tmp_path / "collapse.json", document)
    rules = write_rules(tmp_path, TWO_RULES)

    result, gate = gate_json(tmp_path, document_path, "--thresholds", rules)

    assert result.exit_code == 1
    reason = gate["rules"][1]["reason"]
    assert reason.startswith("metric not found")
    assert "collapse.modalities.fused has no key 'cosine'" in reason
    assert gate["rules"][1]["value"] is None


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (math.nan, "is NaN"),
        (math.inf, "is infinite"),
        (None, "is null, not a number"),
        ("0.6", "is the string '0.6', not a number"),
        (True, "is the boolean true, not a number"),
        ({"value": 0.6}, "is a table, not a number"),
    ],
)
def test_non_finite_metric_fails_closed(tmp_path, value, fragment):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document(rank_ratio=value))
    rules = write_rules(tmp_path, TWO_RULES)

    result, gate = gate_json(tmp_path, document_path, "--thresholds", rules)

    assert result.exit_code == 1, result.output
    assert gate["rules"][0]["passed"] is False
    assert fragment in gate["rules"][0]["reason"]


def test_document_kind_not_given_fails_rule(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES + """
[[rule]]
metric = "retrieval.directions.vision->text.global.recall@5"
min = 0.5
""")

    result, gate = gate_json(tmp_path, document_path, "--thresholds", rules)

    assert result.exit_code == 1
    assert gate["rules"][2]["reason"] == "no retrieval document: pass its JSON file or a run directory"


def test_several_json_documents(tmp_path):
    collapse_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    retrieval_path = write_json_file(tmp_path / "retrieval.json", retrieval_document(recall_at_5=0.4))
    rules = write_rules(tmp_path, TWO_RULES + """
[[rule]]
metric = "retrieval.directions.vision->text.global.recall@5"
min = 0.5
""")

    result, gate = gate_json(tmp_path, collapse_path, retrieval_path, "--thresholds", rules)

    assert result.exit_code == 1
    assert [rule["passed"] for rule in gate["rules"]] == [True, True, False]
    assert gate["rules"][2]["value"] == 0.4
    assert gate["sources"] == {"collapse": str(collapse_path), "retrieval": str(retrieval_path)}


def test_equals_rule_for_verdicts(tmp_path):
    rules = write_rules(tmp_path, """
[[rule]]
metric = "collapse.verdict"
equals = "healthy"
""")
    healthy = write_json_file(tmp_path / "healthy.json", collapse_document())
    collapsed = write_json_file(tmp_path / "collapsed.json", collapse_document(verdict="complete_collapse"))

    assert invoke("gate", healthy, "--thresholds", rules).exit_code == 0
    result, gate = gate_json(tmp_path, collapsed, "--thresholds", rules)

    assert result.exit_code == 1
    assert gate["rules"][0]["value"] == "complete_collapse"
    assert gate["rules"][0]["reason"] == "value 'complete_collapse' is not 'healthy'"


def test_equals_does_not_coerce_types():
    found = DocumentSet(documents={"collapse": {"flag": True, "count": 1, "ratio": 1.0, "text": "1"}})

    def passed(metric, expected):
        return evaluate_rule(Rule(number=1, metric=metric, equals=expected), found, None)["passed"]

    assert passed("collapse.flag", True)
    assert not passed("collapse.flag", 1)
    assert not passed("collapse.count", True)
    assert passed("collapse.count", 1.0)
    assert passed("collapse.ratio", 1)
    assert not passed("collapse.text", 1)


# --------------------------------------------------------------------------------------------------
# Metric paths


def test_metric_path_with_arrow_and_at():
    documents = {"retrieval": retrieval_document()}

    assert lookup_metric(documents, "retrieval.directions.vision->text.global.recall@5") == 0.7


def test_metric_path_matches_longest_dotted_key():
    documents = {"retrieval": {"recall@0.5": 1.0, "recall@0": {"5": 2.0, "5x": {"y": 3.0}}, "a.b": {"c": 4.0}}}

    assert lookup_metric(documents, "retrieval.recall@0.5") == 1.0
    assert lookup_metric(documents, "retrieval.recall@0.5x.y") == 3.0
    assert lookup_metric(documents, "retrieval.a.b.c") == 4.0


def test_metric_path_prefers_longest_key():
    documents = {"collapse": {"a.b": 1.0, "a": {"b": 2.0}}}

    assert lookup_metric(documents, "collapse.a.b") == 1.0


def test_metric_path_backtracks_to_shorter_key():
    documents = {"collapse": {"a.b": {"x": 1.0}, "a": {"b": {"c": 2.0}}}}

    assert lookup_metric(documents, "collapse.a.b.c") == 2.0
    with pytest.raises(MetricNotFound, match="collapse.a.b has no key 'd' \\(keys: x\\)"):
        lookup_metric(documents, "collapse.a.b.d")


def test_metric_path_indexes_lists():
    documents = {"collapse": {"epochs": [{"verdict": "healthy"}, {"verdict": "complete_collapse"}]}}

    assert lookup_metric(documents, "collapse.epochs.0.verdict") == "healthy"
    assert lookup_metric(documents, "collapse.epochs.-1.verdict") == "complete_collapse"
    with pytest.raises(MetricNotFound, match="list of 2; '2' is not an index"):
        lookup_metric(documents, "collapse.epochs.2.verdict")


def test_metric_path_errors_name_the_step():
    documents = {"collapse": collapse_document()}

    with pytest.raises(MetricNotFound, match="collapse.modalities has no key 'vision' \\(keys: fused\\)"):
        lookup_metric(documents, "collapse.modalities.vision.std_l2")
    with pytest.raises(MetricNotFound, match="collapse.verdict is the string 'healthy', not a table"):
        lookup_metric(documents, "collapse.verdict.name")
    with pytest.raises(MetricNotFound, match="no sparsity document"):
        lookup_metric(documents, "sparsity.components.alignment.zero_share")


# --------------------------------------------------------------------------------------------------
# Invalid rule files: exit 2


def test_broken_toml_names_line_and_column(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, '[[rule]]\nmetric = "collapse.verdict"\nmin 0.3\n')

    result = invoke("gate", document_path, "--thresholds", rules)

    assert_input_error(result, str(rules), "invalid TOML", "line 3", "column")


def test_unknown_rule_key_names_key_and_rule(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES + f'\n[[rule]]\nmetric = "{RANK_RATIO}"\nminimum = 0.3\n')

    result = invoke("gate", document_path, "--thresholds", rules)

    assert_input_error(result, "rule 3", "unknown key 'minimum'")


def test_rule_without_bound(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, f'[[rule]]\nmetric = "{RANK_RATIO}"\nname = "no bound"\n')

    result = invoke("gate", document_path, "--thresholds", rules)

    assert_input_error(result, "rule 1", "has no bound")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[rule]\nmetric = "collapse.verdict"\nmin = 1\n', "write [[rule]], not [rule]"),
        ("title = 'x'\n", "unknown top-level key 'title'"),
        ("", "contains no [[rule]] tables"),
        ("[[rule]]\nmin = 0.3\n", "needs a 'metric' string"),
        ('[[rule]]\nmetric = "colapse.verdict"\nmin = 0.3\n', "must start with a document name"),
        ('[[rule]]\nmetric = "collapse"\nmin = 0.3\n', "must start with a document name"),
        (f'[[rule]]\nmetric = "{RANK_RATIO}"\nmin = "0.3"\n', "'min' must be a finite number"),
        (f'[[rule]]\nmetric = "{RANK_RATIO}"\nmin = nan\n', "'min' must be a finite number"),
        (f'[[rule]]\nmetric = "{RANK_RATIO}"\nmin = true\n', "'min' must be a finite number"),
        (f'[[rule]]\nmetric = "{RANK_RATIO}"\nmax_drop = -0.1\n', "'max_drop' must be >= 0"),
        (f'[[rule]]\nmetric = "{RANK_RATIO}"\nmin = 0.5\nmax = 0.2\n', "min 0.5 is above max 0.2"),
        ('[[rule]]\nmetric = "collapse.verdict"\nequals = "healthy"\nmin = 0\n', "cannot be combined with min"),
        ('[[rule]]\nmetric = "collapse.verdict"\nequals = ["healthy"]\n', "'equals' must be a string"),
        (f'[[rule]]\nmetric = "{RANK_RATIO}"\nmin = 0.1\nname = 3\n', "'name' must be a string"),
    ],
)
def test_invalid_rules_exit_2(tmp_path, text, fragment):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, text)

    result = invoke("gate", document_path, "--thresholds", rules)

    assert_input_error(result, str(rules), fragment)


def test_parse_rules_keeps_order_and_fields():
    rules = parse_rules(
        {"rule": [{"metric": RANK_RATIO, "min": 1, "name": "rank", "description": "why"},
                  {"metric": COSINE_MEAN, "max": 0.5, "max_rise_pct": 10}]},
        "inline",
    )

    assert [rule.number for rule in rules] == [1, 2]
    assert rules[0].min == 1.0
    assert isinstance(rules[0].min, float)
    assert rules[0].description == "why"
    assert rules[0].document == "collapse"
    assert not rules[0].needs_baseline
    assert rules[1].needs_baseline


def test_missing_rules_file(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())

    assert_input_error(invoke("gate", document_path, "--thresholds", tmp_path / "none.toml"), "no such rules file")
    (tmp_path / "rules").mkdir()
    assert_input_error(invoke("gate", document_path, "--thresholds", tmp_path / "rules"), "is a directory, not a rules")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not a readable JSON file"),
        ('{"schema": "gate/1", "passed": true}', "'schema' is 'gate/1'; expected one of collapse/1"),
        ("[1, 2]", "no 'schema' key; expected one of"),
    ],
)
def test_invalid_json_input_exit_2(tmp_path, content, fragment):
    document_path = tmp_path / "input.json"
    document_path.write_text(content)
    rules = write_rules(tmp_path, TWO_RULES)

    assert_input_error(invoke("gate", document_path, "--thresholds", rules), str(document_path), fragment)


def test_two_documents_of_one_kind_exit_2(tmp_path):
    first = write_json_file(tmp_path / "a.json", collapse_document())
    second = write_json_file(tmp_path / "b.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES)

    assert_input_error(invoke("gate", first, second, "--thresholds", rules), "a second collapse document")


def test_missing_input_exit_2(tmp_path):
    rules = write_rules(tmp_path, TWO_RULES)

    assert_input_error(invoke("gate", tmp_path / "nope", "--thresholds", rules), "no such file or directory")


def test_thresholds_option_required(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())

    result = invoke("gate", document_path)

    assert result.exit_code == 2
    assert "--thresholds" in result.output


# --------------------------------------------------------------------------------------------------
# Baselines


DROP_RULES = f"""
[[rule]]
name = "rank, absolute drop"
metric = "{RANK_RATIO}"
max_drop = 0.1

[[rule]]
name = "rank, relative drop"
metric = "{RANK_RATIO}"
max_drop_pct = 20

[[rule]]
name = "cosine rise"
metric = "{COSINE_MEAN}"
max_rise = 0.1
"""


def record_baseline(tmp_path, document, *options):
    source = write_json_file(tmp_path / "baseline_input.json", document)
    output = tmp_path / "baseline.json"
    result = invoke("baseline", source, "-o", output, *options)
    assert result.exit_code == 0, result.output
    return output


@pytest.mark.parametrize(
    ("rank_ratio", "cosine_mean", "passed", "reasons"),
    [
        # Baseline: rank ratio 0.6, cosine mean 0.2.
        (0.55, 0.25, [True, True, True], [None, None, None]),
        (0.49, 0.2, [False, True, True], ["dropped 0.11 from baseline 0.6 (max_drop 0.1)", None, None]),
        (0.47, 0.2, [False, False, True], [
            "dropped 0.13 from baseline 0.6 (max_drop 0.1)",
            "dropped 21.6667% from baseline 0.6 (max_drop_pct 20)",
            None,
        ]),
        (0.9, 0.35, [True, True, False], [None, None, "rose 0.15 from baseline 0.2 (max_rise 0.1)"]),
    ],
)
def test_baseline_drop_absolute_and_pct(tmp_path, rank_ratio, cosine_mean, passed, reasons):
    baseline = record_baseline(tmp_path, collapse_document())
    current = write_json_file(tmp_path / "current.json", collapse_document(rank_ratio, cosine_mean))
    rules = write_rules(tmp_path, DROP_RULES)

    result, gate = gate_json(tmp_path, current, "--thresholds", rules, "--baseline", baseline)

    assert result.exit_code == (0 if all(passed) else 1), result.output
    assert [rule["passed"] for rule in gate["rules"]] == passed
    assert [rule["reason"] for rule in gate["rules"]] == reasons
    first = gate["rules"][0]
    assert first["baseline"] == 0.6
    assert first["delta"] == pytest.approx(rank_ratio - 0.6)
    assert first["delta_pct"] == pytest.approx(100 * (rank_ratio - 0.6) / 0.6)
    assert first["max_drop"] == 0.1


def test_baseline_bound_without_baseline_fails(tmp_path):
    current = write_json_file(tmp_path / "current.json", collapse_document())
    rules = write_rules(tmp_path, DROP_RULES)

    result, gate = gate_json(tmp_path, current, "--thresholds", rules)

    assert result.exit_code == 1
    for rule in gate["rules"]:
        assert rule["passed"] is False
        assert "pass --baseline FILE" in rule["reason"]


def test_pct_drop_from_zero_baseline():
    baseline = {"collapse": collapse_document(rank_ratio=0.0)}
    rule = Rule(number=1, metric=RANK_RATIO, max_drop_pct=50)

    unchanged = evaluate_rule(rule, DocumentSet(documents={"collapse": collapse_document(rank_ratio=0.0)}), baseline)
    risen = evaluate_rule(rule, DocumentSet(documents={"collapse": collapse_document(rank_ratio=0.2)}), baseline)
    fallen = evaluate_rule(rule, DocumentSet(documents={"collapse": collapse_document(rank_ratio=-0.2)}), baseline)

    assert unchanged["passed"] and unchanged["delta_pct"] == 0.0
    assert risen["passed"] and risen["delta_pct"] == math.inf
    assert not fallen["passed"]
    assert fallen["reason"] == "dropped inf% from baseline 0 (max_drop_pct 50)"


def test_pct_drop_of_negative_baseline_uses_magnitude():
    # Uniformity is negative; a fall from -2.0 to -2.5 is a 25% drop.
    baseline = {"collapse": collapse_document(rank_ratio=-2.0)}
    rule = Rule(number=1, metric=RANK_RATIO, max_drop_pct=20)

    result = evaluate_rule(rule, DocumentSet(documents={"collapse": collapse_document(rank_ratio=-2.5)}), baseline)

    assert result["delta_pct"] == pytest.approx(-25.0)
    assert not result["passed"]


def test_baseline_lacking_metric_fails_rule(tmp_path):
    baseline_document = collapse_document()
    del baseline_document["modalities"]["fused"]["effective_rank_ratio"]
    baseline = record_baseline(tmp_path, baseline_document)
    current = write_json_file(tmp_path / "current.json", collapse_document())
    rules = write_rules(tmp_path, DROP_RULES)

    result, gate = gate_json(tmp_path, current, "--thresholds", rules, "--baseline", baseline)

    assert result.exit_code == 1
    assert gate["rules"][0]["reason"].startswith("baseline metric not found: collapse.modalities.fused has no key")
    assert gate["rules"][2]["passed"] is True


def test_baseline_shown_for_rules_without_baseline_bound(tmp_path):
    baseline = record_baseline(tmp_path, collapse_document())
    current = write_json_file(tmp_path / "current.json", collapse_document(rank_ratio=0.5))
    rules = write_rules(tmp_path, TWO_RULES)

    result, gate = gate_json(tmp_path, current, "--thresholds", rules, "--baseline", baseline)

    assert result.exit_code == 0
    assert gate["rules"][0]["baseline"] == 0.6
    assert gate["rules"][0]["delta"] == pytest.approx(-0.1)


def test_baseline_file_layout(tmp_path):
    baseline_path = record_baseline(tmp_path, collapse_document())

    baseline = json.loads(baseline_path.read_text())

    assert baseline["schema"] == "baseline/1"
    assert baseline["created"].endswith("+00:00")
    assert baseline["source"] == [str(tmp_path / "baseline_input.json")]
    assert list(baseline["documents"]) == ["collapse"]
    assert baseline["documents"]["collapse"]["modalities"]["fused"]["effective_rank_ratio"] == 0.6


def test_baseline_with_thresholds_records_rule_metrics(tmp_path):
    collapse_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    retrieval_path = write_json_file(tmp_path / "retrieval.json", retrieval_document())
    rules = write_rules(tmp_path, DROP_RULES)
    output = tmp_path / "baseline.json"

    result = invoke("baseline", collapse_path, retrieval_path, "-o", output, "--thresholds", rules)

    assert result.exit_code == 0, result.output
    baseline = json.loads(output.read_text())
    assert list(baseline["documents"]) == ["collapse"]
    assert baseline["metrics"] == {RANK_RATIO: 0.6, COSINE_MEAN: 0.2}
    assert baseline["thresholds"] == str(rules)


def test_baseline_with_thresholds_rejects_missing_metric(tmp_path):
    document = collapse_document()
    document["modalities"]["fused"]["cosine"]["mean"] = None
    source = write_json_file(tmp_path / "collapse.json", document)
    rules = write_rules(tmp_path, DROP_RULES)

    result = invoke("baseline", source, "-o", tmp_path / "baseline.json", "--thresholds", rules)

    assert_input_error(result, "rule 3", COSINE_MEAN, "is null")
    assert not (tmp_path / "baseline.json").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (json.dumps(collapse_document()), "'schema' is 'collapse/1', not 'baseline/1'"),
        (json.dumps({"schema": "baseline/1", "documents": []}), "'documents' must be a table"),
        (json.dumps({"schema": "baseline/1", "documents": {"collapse": retrieval_document()}}),
         "documents.collapse is not a collapse/1 document"),
        ("{", "not a readable JSON file"),
    ],
)
def test_invalid_baseline_exit_2(tmp_path, content, fragment):
    current = write_json_file(tmp_path / "current.json", collapse_document())
    baseline = tmp_path / "baseline.json"
    baseline.write_text(content)
    rules = write_rules(tmp_path, DROP_RULES)

    assert_input_error(invoke("gate", current, "--thresholds", rules, "--baseline", baseline), fragment)


# --------------------------------------------------------------------------------------------------
# Reports


MIXED_RULES = TWO_RULES + """
[[rule]]
name = "pipes | and <xml> & quotes \\""
metric = "collapse.verdict"
equals = "healthy"
"""


def test_junit_report_parses(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document(rank_ratio=0.1, verdict="bad"))
    rules = write_rules(tmp_path, MIXED_RULES)
    junit = tmp_path / "gate.xml"

    result = invoke("gate", document_path, "--thresholds", rules, "--junit", junit)

    assert result.exit_code == 1
    root = ElementTree.parse(junit).getroot()
    suites = list(root.iter("testsuite"))
    assert len(suites) == 1
    suite = suites[0]
    assert suite.get("name") == "diagnose gate"
    assert suite.get("tests") == "3"
    assert suite.get("failures") == "2"
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == ["fused rank", "rule 2", 'pipes | and <xml> & quotes "']
    assert cases[0].get("classname") == "diagnose gate.collapse"
    failures = suite.findall("testcase/failure")
    assert len(failures) == 2
    assert failures[0].get("message") == "0.1 is below min 0.3"
    assert failures[0].text.splitlines()[0] == "0.1 is below min 0.3"
    assert f"metric: {RANK_RATIO}" in failures[0].text
    assert failures[1].get("message") == "value 'bad' is not 'healthy'"
    assert cases[1].find("failure") is None


def test_junit_names_unique_per_rule(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, f"""
[[rule]]
name = "rank"
metric = "{RANK_RATIO}"
min = 0.1

[[rule]]
name = "rank"
metric = "{RANK_RATIO}"
max = 0.9
""")
    junit = tmp_path / "gate.xml"

    result = invoke("gate", document_path, "--thresholds", rules, "--junit", junit)

    assert result.exit_code == 0
    names = [case.get("name") for case in ElementTree.parse(junit).getroot().iter("testcase")]
    assert names == ["rank (rule 1)", "rank (rule 2)"]


def test_markdown_report(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document(rank_ratio=0.1))
    rules = write_rules(tmp_path, MIXED_RULES)
    markdown = tmp_path / "gate.md"

    result = invoke("gate", document_path, "--thresholds", rules, "--markdown", markdown)

    assert result.exit_code == 1
    lines = markdown.read_text().splitlines()
    assert lines[0] == "### diagnose gate: failed (1 of 3 rules)"
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 3
    header_cells = table[0].count(" | ") + 1
    for row in table[1:]:
        assert row.replace("\\|", "").count(" | ") + 1 == header_cells, row
    assert table[2].startswith("| **FAIL** | fused rank | `collapse.modalities.fused.effective_rank_ratio` | 0.1 |")
    assert table[2].endswith("| 0.1 is below min 0.3 |")
    assert "pipes \\| and &lt;xml&gt; &amp; quotes" in table[4]


def test_github_step_summary_appended(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES)
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")

    result = invoke("gate", document_path, "--thresholds", rules, env={"GITHUB_STEP_SUMMARY": str(summary)})

    assert result.exit_code == 0
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    assert "### diagnose gate: passed" in text
    assert "| pass | fused rank |" in text


def test_no_step_summary_without_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.chdir(tmp_path)
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES)

    result = invoke("gate", document_path, "--thresholds", rules)

    assert result.exit_code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["collapse.json", "rules.toml"]


def test_json_to_stdout_keeps_table_on_stderr(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES)

    result = invoke("gate", document_path, "--thresholds", rules, "--json", "-")

    assert result.exit_code == 0
    assert json.loads(result.stdout)["passed"] is True
    assert "gate: passed (2 rules)" in result.stderr


def test_report_into_missing_folder_exit_2(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES)

    result = invoke("gate", document_path, "--thresholds", rules, "--junit", tmp_path / "no" / "gate.xml")

    assert_input_error(result, "--junit", "does not exist")
    assert not (tmp_path / "no").exists()


def test_report_write_leaves_no_temporary_file(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document())
    rules = write_rules(tmp_path, TWO_RULES)
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "gate.md").write_text("old report")

    result = invoke("gate", document_path, "--thresholds", rules, "--junit", reports / "gate.xml",
                    "--markdown", reports / "gate.md")

    assert result.exit_code == 0
    assert sorted(path.name for path in reports.iterdir()) == ["gate.md", "gate.xml"]
    assert "old report" not in (reports / "gate.md").read_text()


# --------------------------------------------------------------------------------------------------
# Run directories


@pytest.fixture
def fake_run(tmp_path):
    """A run with a healthy epoch 0 and a collapsed epoch 1 (every panel near one vector)."""
    run = tmp_path / "run"
    (run / "embeddings").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "run.json").write_text(json.dumps({"seed": 0}))
    (run / "metrics.jsonl").write_text("")
    rng = np.random.default_rng(0)
    page = np.repeat(np.arange(12), 4).astype(np.int64)
    healthy = rng.standard_normal((48, 16)).astype(np.float32)
    collapsed = (1.0 + 0.01 * rng.standard_normal((48, 16))).astype(np.float32)
    for epoch, fused in ((0, healthy), (1, collapsed)):
        save_file(
            {"fused": fused, "page": page},
            str(run / "embeddings" / f"epoch_{epoch:04d}.safetensors"),
            metadata={"format": "collapse-toolkit/embeddings", "epoch": str(epoch)},
        )
    return run


RUN_RULES = f"""
[[rule]]
name = "fused rank"
metric = "{RANK_RATIO}"
min = 0.3

[[rule]]
metric = "collapse.modalities.fused.std_l2_ratio"
min = 0.3

[[rule]]
metric = "{COSINE_MEAN}"
max = 0.8
"""


def test_run_directory_last_epoch_by_default(tmp_path, fake_run):
    rules = write_rules(tmp_path, RUN_RULES)

    result, gate = gate_json(tmp_path, fake_run, "--thresholds", rules)

    assert result.exit_code == 1, result.output
    assert [rule["passed"] for rule in gate["rules"]] == [False, False, False]
    assert gate["sources"] == {"collapse": str(fake_run)}
    assert gate["rules"][2]["value"] > 0.99


def test_run_directory_epoch_selection(tmp_path, fake_run):
    rules = write_rules(tmp_path, RUN_RULES + '\n[[rule]]\nmetric = "collapse.epoch"\nequals = 0\n')

    result, gate = gate_json(tmp_path, fake_run, "--thresholds", rules, "--epoch", "0")

    assert result.exit_code == 0, result.output
    assert gate["epoch"] == 0
    assert gate["rules"][0]["value"] > 0.5


def test_run_directory_unknown_epoch(tmp_path, fake_run):
    rules = write_rules(tmp_path, RUN_RULES)

    result = invoke("gate", fake_run, "--thresholds", rules, "--epoch", "7")

    assert_input_error(result, "no epoch 7 (available: 0, 1)")


def test_epoch_of_embedding_file_rejected(tmp_path, fake_run):
    rules = write_rules(tmp_path, RUN_RULES)

    result = invoke("gate", fake_run / "embeddings" / "epoch_0000.safetensors", "--thresholds", rules, "--epoch", "0")

    assert_input_error(result, "--epoch 0 needs a run directory or checkpoint")


def test_json_document_overrides_run_directory(tmp_path, fake_run):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document(rank_ratio=0.9, cosine_mean=0.1))
    rules = write_rules(tmp_path, RUN_RULES)

    result, gate = gate_json(tmp_path, fake_run, document_path, "--thresholds", rules)

    assert result.exit_code == 0, result.output
    assert gate["sources"] == {"collapse": str(document_path)}


def test_json_document_of_other_epoch_rejected(tmp_path):
    document_path = write_json_file(tmp_path / "collapse.json", collapse_document(epoch=3))
    rules = write_rules(tmp_path, TWO_RULES)

    result = invoke("gate", document_path, "--thresholds", rules, "--epoch", "2")

    assert_input_error(result, "document is of epoch 3, but --epoch 2 was requested")


def test_two_run_directories_rejected(tmp_path, fake_run):
    rules = write_rules(tmp_path, RUN_RULES)

    result = invoke("gate", fake_run, fake_run, "--thresholds", rules)

    assert_input_error(result, "give at most one run directory")


def test_sparsity_rule_on_empty_log_exit_2(tmp_path, fake_run):
    rules = write_rules(tmp_path, RUN_RULES + """
[[rule]]
metric = "sparsity.components.alignment.zero_share"
max = 0.5
""")

    result = invoke("gate", fake_run, "--thresholds", rules, "--epoch", "0")

    assert_input_error(result, "metrics.jsonl: the log is empty")


@pytest.fixture
def paired_run(tmp_path):
    """A run whose text embedding of each panel is its image embedding plus a little noise."""
    run = tmp_path / "paired"
    (run / "embeddings").mkdir(parents=True)
    rng = np.random.default_rng(1)
    vision = rng.standard_normal((40, 16)).astype(np.float32)
    text = (vision + 0.1 * rng.standard_normal((40, 16))).astype(np.float32)
    save_file(
        {"fused": vision + text, "vision": vision, "text": text, "page": np.repeat(np.arange(10), 4),
         "item": np.arange(40)},
        str(run / "embeddings" / "epoch_0003.safetensors"),
        metadata={"format": "collapse-toolkit/embeddings", "epoch": "3"},
    )
    return run


def test_retrieval_built_from_run(tmp_path, paired_run):
    rules = write_rules(tmp_path, """
[[rule]]
metric = "retrieval.directions.vision->text.global.recall@5"
min = 0.9

[[rule]]
metric = "retrieval.directions.text->vision.page.recall@1"
min = 0.9
""")

    result, gate = gate_json(tmp_path, paired_run, "--thresholds", rules)

    assert result.exit_code == 0, result.output
    assert gate["sources"] == {"retrieval": str(paired_run)}
    assert gate["rules"][0]["value"] == 1.0


def test_retrieval_of_fused_only_run_exit_2(tmp_path, fake_run):
    rules = write_rules(tmp_path, """
[[rule]]
metric = "retrieval.directions.vision->text.global.recall@5"
min = 0.5
""")

    result = invoke("gate", fake_run, "--thresholds", rules)

    assert_input_error(result, "no modality 'vision' for retrieval")


def test_baseline_skips_unbuildable_documents(tmp_path, fake_run):
    output = tmp_path / "baseline.json"

    result = invoke("baseline", fake_run, "-o", output)

    assert result.exit_code == 0, result.output
    assert list(json.loads(output.read_text())["documents"]) == ["collapse"]
    assert "warning: retrieval document not recorded" in result.stderr


def test_baseline_records_every_buildable_document(tmp_path, paired_run):
    output = tmp_path / "baseline.json"

    result = invoke("baseline", paired_run, "-o", output)

    assert result.exit_code == 0, result.output
    baseline = json.loads(output.read_text())
    assert list(baseline["documents"]) == ["collapse", "retrieval"]
    assert baseline["documents"]["retrieval"]["epoch"] == 3


def test_only_needed_documents_are_built(tmp_path):
    calls = []

    def builder(kind):
        def build(source, epoch):
            calls.append((kind, source.name, epoch))
            return {"schema": f"{kind}/1", "value": 1.0}
        return build

    builders = {kind: builder(kind) for kind in ("collapse", "retrieval", "sparsity")}
    (tmp_path / "run").mkdir()

    found = gather_documents([tmp_path / "run"], ["retrieval", "retrieval"], epoch=4, builders=builders)

    assert calls == [("retrieval", "run", 4)]
    assert list(found.documents) == ["retrieval"]


def test_baseline_from_run_then_gate(tmp_path, fake_run):
    rules = write_rules(tmp_path, f'[[rule]]\nmetric = "{RANK_RATIO}"\nmax_drop_pct = 10\n')
    baseline = tmp_path / "baseline.json"

    recorded = invoke("baseline", fake_run, "-o", baseline, "--epoch", "0")
    same = invoke("gate", fake_run, "--thresholds", rules, "--baseline", baseline, "--epoch", "0")
    later = invoke("gate", fake_run, "--thresholds", rules, "--baseline", baseline)

    assert recorded.exit_code == 0, recorded.output
    assert json.loads(baseline.read_text())["documents"]["collapse"]["epoch"] == 0
    assert same.exit_code == 0, same.output
    assert later.exit_code == 1, later.output
    assert "max_drop_pct 10" in later.output


def test_baseline_of_run_without_step_log_is_input_error(tmp_path, fake_run):
    rules = write_rules(tmp_path, '[[rule]]\nmetric = "sparsity.components.alignment.zero_share"\nmax_rise = 0.1\n')

    result = invoke("baseline", fake_run, "-o", tmp_path / "baseline.json", "--thresholds", rules)

    assert_input_error(result, "metrics.jsonl: the log is empty, so there are no step records")


def test_gather_rejects_input_error_from_builder(tmp_path):
    def failing(source, epoch):
        raise InputError(f"{source}: no 'vision' matrix")

    (tmp_path / "run").mkdir()
    with pytest.raises(InputError, match="no 'vision' matrix"):
        gather_documents([tmp_path / "run"], ["retrieval"], builders={"retrieval": failing})


# --------------------------------------------------------------------------------------------------
# The bundled rule set on trained runs


REPOSITORY = Path(__file__).resolve().parent.parent


def train(config_name, run_dir, epochs):
    """Fit a run of a bundled config with the tiny trainable backbones (about 10 s per epoch on a CPU)."""
    completed = subprocess.run(
        [sys.executable, "-m", "trainer", "fit", "--config", str(REPOSITORY / "configs" / config_name),
         "--out", str(run_dir), "--set", f"optim.epochs={epochs}"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return run_dir


def test_bundled_rules_pass_default_run(tmp_path, bundled_run):
    run = bundled_run("default.toml")

    result, gate = gate_json(tmp_path, run, "--thresholds", REPOSITORY / "configs" / "gate.toml")

    assert result.exit_code == 0, result.output
    assert len(gate["rules"]) == 7
    assert "gate: passed (7 rules)" in result.output


def test_bundled_rules_fail_collapse_run(tmp_path, bundled_run):
    run = bundled_run("collapse.toml")

    result, gate = gate_json(tmp_path, run, "--thresholds", REPOSITORY / "configs" / "gate.toml")

    assert result.exit_code == 1, result.output
    failed = {rule["name"] for rule in gate["rules"] if not rule["passed"]}
    assert {"fused spread", "fused mean cosine", "pages stay apart", "vision spread", "verdict"} <= failed
    assert "value 'complete_collapse' is not 'healthy'" in result.output
    assert "fused mean cosine" in result.output
    assert "above max 0.8" in result.output
