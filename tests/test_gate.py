"""The CI gate over report.json and its JUnit XML."""
from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest

from deploy.errors import BadInput
from deploy.gate import evaluate_gate, load_report, write_junit

REPORT = {
    "schema_version": 1,
    "target": {"name": "cpu", "backend": "onnxruntime-cpu", "precision": "fp32", "batch_size": 1,
               "input_shape": [3, 32, 32]},
    "budget": {"kind": "latency_ms", "value": 2.0},
    "met": True,
    "baseline": {"latency_ms": {"median": 3.0, "p90": 3.2, "p99": 3.5, "cv": 0.02}, "accuracy": 0.92},
    "compressed": {"latency_ms": {"median": 1.8, "p90": 1.9, "p99": 2.1, "cv": 0.03}, "accuracy": 0.90},
}


def report(**changes):
    r = copy.deepcopy(REPORT)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = r
        for key in path:
            node = node[key]
        node[last] = value
    return r


def by_name(result):
    return {c.name: c for c in result.checks}


def test_all_checks_pass():
    res = evaluate_gate(report(), max_latency_ms=2.0, min_accuracy=0.9, max_accuracy_drop=0.02)
    assert res.passed
    checks = by_name(res)
    assert set(checks) == {"budget_met", "max_latency_ms", "min_accuracy", "max_accuracy_drop"}
    assert checks["max_latency_ms"].value == 1.8 and checks["max_latency_ms"].threshold == 2.0
    assert checks["max_accuracy_drop"].value == pytest.approx(0.02)


def test_only_budget_checked_without_thresholds():
    res = evaluate_gate(report())
    assert res.passed and [c.name for c in res.checks] == ["budget_met"]
    res = evaluate_gate(report(met=False))
    assert not res.passed and "not met" in res.checks[0].message


@pytest.mark.parametrize(
    "kwargs,failing",
    [
        (dict(max_latency_ms=1.5), "max_latency_ms"),
        (dict(min_accuracy=0.95), "min_accuracy"),
        (dict(max_accuracy_drop=0.01), "max_accuracy_drop"),
    ],
)
def test_each_threshold_can_fail(kwargs, failing):
    res = evaluate_gate(report(), **kwargs)
    assert not res.passed
    assert [c.name for c in res.checks if not c.passed] == [failing]


def test_unmeasured_accuracy_fails_an_accuracy_threshold():
    res = evaluate_gate(report(compressed__accuracy=None), min_accuracy=0.5, max_accuracy_drop=0.1)
    checks = by_name(res)
    assert not res.passed
    assert not checks["min_accuracy"].passed and "not measured" in checks["min_accuracy"].message
    assert not checks["max_accuracy_drop"].passed and checks["max_accuracy_drop"].value is None
    # Without accuracy thresholds, a null accuracy is fine.
    assert evaluate_gate(report(compressed__accuracy=None, baseline__accuracy=None)).passed


def test_unmeasured_latency_fails_a_latency_threshold():
    res = evaluate_gate(report(compressed__latency_ms=None), max_latency_ms=5)
    assert not res.passed and "not measured" in by_name(res)["max_latency_ms"].message


@pytest.mark.parametrize(
    "bad,kwargs",
    [
        (report(schema_version=2), {}),
        ({k: v for k, v in REPORT.items() if k != "met"}, {}),
        ({k: v for k, v in REPORT.items() if k != "compressed"}, {}),
        (report(compressed__accuracy=90.0), dict(min_accuracy=0.5)),  # percent, not a fraction
        (report(compressed__latency_ms={"p90": 1}), dict(max_latency_ms=1)),
        (report(), dict(min_accuracy=90)),
        (report(), dict(max_accuracy_drop=-0.1)),
        (report(), dict(max_latency_ms=0)),
        ([1, 2], {}),
    ],
)
def test_invalid_report_or_threshold_is_bad_input(bad, kwargs):
    with pytest.raises(BadInput) as err:
        evaluate_gate(bad, **kwargs)
    assert "\n" not in str(err.value)


def test_junit_xml(tmp_path):
    res = evaluate_gate(report(), max_latency_ms=1.5, min_accuracy=0.8)
    path = write_junit(res, tmp_path / "ci" / "gate.xml", suite_name="edge-gate")
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite.get("name") == "edge-gate" and suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"budget_met", "max_latency_ms", "min_accuracy"}
    failure = cases["max_latency_ms"].find("failure")
    assert failure is not None and "1.8" in failure.get("message") and "1.5" in failure.get("message")
    assert cases["budget_met"].find("failure") is None and cases["min_accuracy"].find("failure") is None
    assert [p.name for p in path.parent.iterdir()] == ["gate.xml"]


def test_load_report(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    assert load_report(path) == REPORT
    with pytest.raises(BadInput, match="not found"):
        load_report(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(BadInput, match="JSON"):
        load_report(path)
