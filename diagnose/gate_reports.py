"""Reports of a ``gate/1`` document: Markdown, JUnit XML and the GitHub step summary.

The rich table is in :mod:`diagnose.render`, which uses the bound and delta texts of this module.
"""

from __future__ import annotations

import html
import math
import os
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

from diagnose.gate import describe_value, format_figure


def describe_bounds(result: dict) -> str:
    """Format the bounds of one rule result in short form, e.g. ``>= 0.2, drop <= 5%``."""
    parts = []
    if result.get("equals") is not None:
        parts.append(f"= {describe_value(result['equals'])}")
    for key, template in (
        ("min", ">= {}"), ("max", "<= {}"), ("max_drop", "drop <= {}"), ("max_drop_pct", "drop <= {}%"),
        ("max_rise", "rise <= {}"), ("max_rise_pct", "rise <= {}%"),
    ):
        if result.get(key) is not None:
            parts.append(template.format(format_figure(result[key])))
    return ", ".join(parts)


def describe_delta(result: dict) -> str:
    """Format the change from the baseline, absolute and in percent, or ``-`` without a baseline value."""
    if result.get("delta") is None:
        return "-"
    text = f"{result['delta']:+.4g}"
    delta_pct = result.get("delta_pct")
    if delta_pct is None:
        return text
    if math.isinf(delta_pct):
        return f"{text} ({format_figure(delta_pct)}%)"
    return f"{text} ({delta_pct:+.3g}%)"


def rule_label(result: dict) -> str:
    return result.get("name") or f"rule {result['number']}"


def format_value(value) -> str:
    if value is None:
        return "-"
    return describe_value(value) if not isinstance(value, str) else value


def gate_markdown(document: dict) -> str:
    """Render the gate result as a Markdown heading and table (GitHub-flavoured)."""
    rules = document["rules"]
    failed = sum(not result["passed"] for result in rules)
    status = "passed" if document["passed"] else f"failed ({failed} of {len(rules)} rules)"
    lines = [
        f"### diagnose gate: {status}",
        "",
        "| result | rule | metric | value | bound | baseline | delta | reason |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for result in rules:
        cells = [
            "pass" if result["passed"] else "**FAIL**",
            rule_label(result),
            f"`{result['metric']}`",
            format_value(result["value"]),
            describe_bounds(result),
            format_value(result["baseline"]),
            describe_delta(result),
            result["reason"] or "",
        ]
        lines.append("| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(text: str) -> str:
    # GitHub renders HTML inside Markdown, so names and reasons from rule files are escaped as text.
    escaped = html.escape(text, quote=False)
    return escaped.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def gate_junit(document: dict) -> str:
    """Render the gate result as JUnit XML: one ``diagnose gate`` test suite, one test case per rule.

    A failed rule gets a ``<failure>`` element whose ``message`` attribute is the reason. The reason also
    opens the element's text, because GitLab's test report has shown that text and not the attribute
    (gitlab-org/gitlab-foss issue 53668). GitLab keys test cases by classname and name, so a rule name
    used twice gets its rule number appended.
    """
    rules = document["rules"]
    failures = sum(not result["passed"] for result in rules)
    counts = {"tests": str(len(rules)), "failures": str(failures), "errors": "0", "skipped": "0", "time": "0"}
    root = ElementTree.Element("testsuites", {"name": "diagnose gate", **counts})
    timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    suite = ElementTree.SubElement(root, "testsuite", {"name": "diagnose gate", **counts, "timestamp": timestamp})

    labels = [rule_label(result) for result in rules]
    for result, label in zip(rules, labels):
        if labels.count(label) > 1:
            label = f"{label} (rule {result['number']})"
        document_name = result["metric"].split(".", 1)[0]
        case = ElementTree.SubElement(
            suite, "testcase", {"classname": f"diagnose gate.{document_name}", "name": label, "time": "0"}
        )
        details = "\n".join([
            f"metric: {result['metric']}",
            f"value: {format_value(result['value'])}",
            f"bound: {describe_bounds(result)}",
            f"baseline: {format_value(result['baseline'])}",
            f"delta: {describe_delta(result)}",
        ])
        if result["passed"]:
            ElementTree.SubElement(case, "system-out").text = details
        else:
            reason = result["reason"] or "failed"
            attributes = {"message": reason, "type": "GateRuleFailed"}
            ElementTree.SubElement(case, "failure", attributes).text = f"{reason}\n{details}"
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def append_step_summary(markdown: str, environ: dict[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to the file named by ``GITHUB_STEP_SUMMARY``, if that variable is set.

    GitHub Actions shows this file on the job's summary page. Appending (not replacing) keeps what earlier
    steps wrote there.
    """
    environ = os.environ if environ is None else environ
    target = environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(markdown + "\n")
    return path


__all__ = [
    "append_step_summary",
    "describe_bounds",
    "describe_delta",
    "gate_junit",
    "gate_markdown",
]
