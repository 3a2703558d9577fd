"""The CI gate: does a finished report meet the thresholds a pipeline demands?

Every check is explicit and reported; a threshold on something the report did not
measure (accuracy null) fails rather than passing silently.
"""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.atomic_io import atomic_write_bytes
from deploy.errors import BadInput


@dataclass
class GateCheck:
    name: str
    passed: bool
    value: float | bool | None
    threshold: float | bool | None
    message: str


@dataclass
class GateResult:
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [c.__dict__.copy() for c in self.checks]}


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read report.json; BadInput if missing or not JSON."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"report not found: {p}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{p}: not a readable JSON report ({exc})") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _section(report: dict[str, Any], key: str) -> dict[str, Any]:
    sec = report.get(key)
    if not isinstance(sec, dict):
        raise BadInput(f"report has no '{key}' section")
    return sec


def _accuracy(section: dict[str, Any], where: str) -> float | None:
    acc = section.get("accuracy")
    if acc is None:
        return None
    value = _number(acc)
    if value is None or not 0 <= value <= 1:
        raise BadInput(f"report {where}.accuracy must be a number in 0..1 or null (got {acc!r})")
    return value


def _median_latency(section: dict[str, Any]) -> float | None:
    lat = section.get("latency_ms")
    if lat is None:
        return None
    if not isinstance(lat, dict) or _number(lat.get("median")) is None:
        raise BadInput(f"report compressed.latency_ms must be {{median: ...}} or null (got {lat!r})")
    return _number(lat["median"])


def evaluate_gate(
    report: dict[str, Any],
    *,
    max_latency_ms: float | None = None,
    min_accuracy: float | None = None,
    max_accuracy_drop: float | None = None,
    allow_predicted: bool = False,
) -> GateResult:
    """Check `report` (schema_version 1): budget met, and each threshold that was given.

    A report whose latencies were predicted from a latency table (no device where it ran) fails
    the `latency_measured` check unless `allow_predicted`: a deployment gate must see a measurement.
    """
    if not isinstance(report, dict):
        raise BadInput("report must be a JSON object")
    if report.get("schema_version") != 1:
        raise BadInput(f"report schema_version must be 1 (got {report.get('schema_version')!r})")
    if not isinstance(report.get("met"), bool):
        raise BadInput("report has no boolean 'met'")
    compressed = _section(report, "compressed")
    baseline = _section(report, "baseline")
    if max_latency_ms is not None and (_number(max_latency_ms) is None or max_latency_ms <= 0):
        raise BadInput(f"max latency must be a positive number of milliseconds (got {max_latency_ms!r})")
    for name, val in (("min accuracy", min_accuracy), ("max accuracy drop", max_accuracy_drop)):
        if val is not None and (_number(val) is None or not 0 <= val <= 1):
            raise BadInput(f"{name} must be a fraction in 0..1 (got {val!r}); e.g. 0.9 for 90%")

    budget = report.get("budget") if isinstance(report.get("budget"), dict) else {}
    checks = [
        GateCheck(
            "budget_met",
            report["met"],
            report["met"],
            True,
            f"budget {budget.get('kind', '?')} <= {budget.get('value', '?')} "
            + ("met" if report["met"] else "not met"),
        )
    ]

    if report.get("latency_source") == "predicted":
        checks.append(GateCheck("latency_measured", allow_predicted, False, True,
                                "latencies were predicted from a latency table, not measured on the target"
                                + (" (allowed by --allow-predicted)" if allow_predicted else
                                   "; measure model.onnx on the device, or pass --allow-predicted")))

    if max_latency_ms is not None:
        median = _median_latency(compressed)
        if median is None:
            checks.append(GateCheck("max_latency_ms", False, None, max_latency_ms, "latency was not measured"))
        else:
            ok = median <= max_latency_ms
            checks.append(
                GateCheck(
                    "max_latency_ms", ok, median, max_latency_ms,
                    f"median latency {median:.4g} ms {'<=' if ok else '>'} {max_latency_ms:g} ms",
                )
            )

    comp_acc = _accuracy(compressed, "compressed")
    if min_accuracy is not None:
        if comp_acc is None:
            checks.append(GateCheck("min_accuracy", False, None, min_accuracy, "accuracy was not measured"))
        else:
            ok = comp_acc >= min_accuracy
            checks.append(
                GateCheck(
                    "min_accuracy", ok, comp_acc, min_accuracy,
                    f"accuracy {comp_acc:.4f} {'>=' if ok else '<'} {min_accuracy:g}",
                )
            )

    if max_accuracy_drop is not None:
        base_acc = _accuracy(baseline, "baseline")
        if comp_acc is None or base_acc is None:
            which = "compressed" if comp_acc is None else "baseline"
            checks.append(
                GateCheck("max_accuracy_drop", False, None, max_accuracy_drop, f"{which} accuracy was not measured")
            )
        else:
            drop = base_acc - comp_acc
            ok = drop <= max_accuracy_drop + 1e-12  # float noise must not fail an exactly-at-threshold drop
            checks.append(
                GateCheck(
                    "max_accuracy_drop", ok, drop, max_accuracy_drop,
                    f"accuracy drop {drop:.4f} ({base_acc:.4f} -> {comp_acc:.4f}) "
                    f"{'<=' if ok else '>'} {max_accuracy_drop:g}",
                )
            )

    return GateResult(passed=all(c.passed for c in checks), checks=checks)


def write_junit(result: GateResult, path: str | os.PathLike, *, suite_name: str = "compress-gate") -> Path:
    """JUnit XML for CI dashboards: one testcase per check, <failure> on the failed ones."""
    failures = sum(not c.passed for c in result.checks)
    suites = ET.Element("testsuites", name=suite_name, tests=str(len(result.checks)), failures=str(failures))
    suite = ET.SubElement(
        suites, "testsuite", name=suite_name, tests=str(len(result.checks)), failures=str(failures), errors="0",
        skipped="0", time="0",
    )
    for check in result.checks:
        case = ET.SubElement(suite, "testcase", classname=suite_name, name=check.name, time="0")
        if check.passed:
            ET.SubElement(case, "system-out").text = check.message
        else:
            failure = ET.SubElement(case, "failure", message=check.message, type="GateFailure")
            failure.text = f"value={check.value!r} threshold={check.threshold!r}: {check.message}"
    data = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    return atomic_write_bytes(path, data)
