"""Environment collection and the telemetry sampler (none on this host; Jetson on a constructed sysfs)."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import stat
import time

import onnxruntime
import pytest

from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU
from deploy.cpu_info import cpu_model, physical_cores, read_cpu_frequency
from deploy.telemetry import (
    TelemetrySampler,
    collect_environment,
    decode_clock_event_reasons,
    find_jetson_gpu_devfreq,
    parse_nvpmodel,
)

HAS_PYNVML = importlib.util.find_spec("pynvml") is not None


def test_collect_environment():
    env = collect_environment(OnnxRuntimeCPU())
    assert env["python"] == platform.python_version()
    assert env["onnxruntime"] == onnxruntime.__version__
    assert env["torch"] and env["onnx"]
    assert env["logical_cores"] == os.cpu_count()
    assert 1 <= env["physical_cores"] <= env["usable_cores"] <= env["logical_cores"]
    assert env["cpu_model"] == cpu_model() and env["cpu_model"]
    assert isinstance(env["cpu_frequency"], dict) and env["cpu_frequency"]
    assert env["backend"]["name"] == "onnxruntime-cpu"
    assert env["backend"]["versions"] == {"onnxruntime": onnxruntime.__version__}
    json.dumps(env)


def _fake_cpufreq(root, cur_khz=2400000, governor="performance"):
    folder = root / "devices/system/cpu/cpu0/cpufreq"
    folder.mkdir(parents=True)
    (folder / "scaling_cur_freq").write_text(f"{cur_khz}\n")
    (folder / "scaling_min_freq").write_text("1000000\n")
    (folder / "scaling_max_freq").write_text("3500000\n")
    (folder / "scaling_governor").write_text(f"{governor}\n")
    return root


def test_cpu_frequency_from_sysfs(tmp_path):
    freq = read_cpu_frequency(_fake_cpufreq(tmp_path))
    assert freq == {"cpu_cur_mhz": 2400.0, "cpu_min_mhz": 1000.0, "cpu_max_mhz": 3500.0, "cpu_governor": "performance"}
    assert "unavailable" in read_cpu_frequency(tmp_path / "nothing")


def test_cpuinfo_parsing(tmp_path):
    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nphysical id\t: 0\ncore id\t: 0\n\n"
        "processor\t: 1\nmodel name\t: Test CPU 9000\nphysical id\t: 0\ncore id\t: 0\n\n"
    )
    assert cpu_model(tmp_path) == "Test CPU 9000"
    # Two hyper-threads of one core (only counted if both CPUs are in our affinity mask).
    assert physical_cores(tmp_path) == 1 or len(os.sched_getaffinity(0)) < 2


def test_none_sampler_on_this_host(tmp_path):
    with TelemetrySampler("none") as sampler:
        time.sleep(0.01)
    res = sampler.result()
    assert res["source"] == "none" and res["available"]
    assert res["throttled"] is False and res["reasons"] == []
    assert res["n_samples"] == 0  # no background thread for a CPU measurement
    assert res["before"] and res["after"]
    json.dumps(res)


def test_none_sampler_reads_cpu_frequency(tmp_path):
    with TelemetrySampler("none", sysfs_root=_fake_cpufreq(tmp_path)) as sampler:
        pass
    res = sampler.result()
    assert res["before"]["cpu_cur_mhz"] == 2400.0
    assert res["samples"]["cpu_cur_mhz"] == {"min": 2400.0, "max": 2400.0, "mean": 2400.0}


@pytest.mark.skipif(HAS_PYNVML, reason="pynvml is installed here")
def test_nvml_missing_reports_instead_of_raising():
    with TelemetrySampler("nvml") as sampler:
        pass
    res = sampler.result()
    assert res["available"] is False and "pynvml" in res["unavailable"]
    assert res["throttled"] is False


def test_nvml_reason_bits():
    assert decode_clock_event_reasons(0) == []
    assert decode_clock_event_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_clock_event_reasons(0x1 | 0x1000) == ["gpu_idle", "unknown_0x1000"]


def test_parse_nvpmodel():
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n") == ("MAXN", 0)
    assert parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Power Mode: MODE_15W\n1\n") == ("MODE_15W", 1)
    assert parse_nvpmodel("garbage") == (None, None)


def _fake_jetson_sysfs(root, cur_hz, min_hz, max_hz, node="17000000.ga10b"):
    gpu = root / "class/devfreq" / node
    gpu.mkdir(parents=True)
    (root / "class/devfreq/15340000.vic").mkdir()  # another devfreq device that must be ignored
    for name, value in (("cur_freq", cur_hz), ("min_freq", min_hz), ("max_freq", max_hz)):
        (gpu / name).write_text(f"{value}\n")
    (gpu / "governor").write_text("nvhost_podgov\n")
    for i, (kind, milli) in enumerate((("gpu-thermal", 45500), ("cpu-thermal", 47000))):
        zone = root / f"class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(f"{milli}\n")
    return root


def _fake_nvpmodel(tmp_path, mode="MODE_15W", mode_id=1):
    script = tmp_path / "nvpmodel"
    script.write_text(f"#!/bin/sh\necho 'NV Power Mode: {mode}'\necho {mode_id}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_jetson_sampler_parses_sysfs_and_flags_slow_clock(tmp_path):
    root = _fake_jetson_sysfs(tmp_path / "sys", cur_hz=306000000, min_hz=306000000, max_hz=1300500000)
    assert find_jetson_gpu_devfreq(root).name == "17000000.ga10b"
    with TelemetrySampler("jetson", interval_s=0.01, sysfs_root=root, nvpmodel=_fake_nvpmodel(tmp_path),
                          expected_power_mode="MAXN") as sampler:
        time.sleep(0.1)
    res = sampler.result()
    assert res["available"] and res["n_samples"] >= 1
    before = res["before"]
    assert before["gpu_cur_mhz"] == 306.0 and before["gpu_max_mhz"] == 1300.5
    assert before["gpu_governor"] == "nvhost_podgov"
    assert before["nvpmodel_mode"] == "MODE_15W" and before["nvpmodel_id"] == 1
    assert before["temp_gpu_thermal_c"] == 45.5
    assert res["samples"]["gpu_cur_mhz"]["max"] == 306.0
    assert res["throttled"] and "gpu_clock_below_max" in res["reasons"][0]
    assert any("jetson_clocks" in w for w in res["warnings"])
    assert any("MAXN" in w for w in res["warnings"])


def test_jetson_sampler_locked_clocks_are_clean(tmp_path):
    root = _fake_jetson_sysfs(tmp_path, 1300500000, 1300500000, 1300500000, node="17000000.gv11b")
    with TelemetrySampler("jetson", interval_s=0.01, sysfs_root=root, nvpmodel="") as sampler:
        time.sleep(0.05)
    res = sampler.result()
    assert res["throttled"] is False and res["warnings"] == []
    assert "nvpmodel_mode" not in res["before"]


def test_jetson_source_missing_reports(tmp_path):
    with TelemetrySampler("jetson", sysfs_root=tmp_path) as sampler:
        pass
    res = sampler.result()
    assert res["available"] is False and "devfreq" in res["unavailable"]


def test_unknown_source():
    with pytest.raises(ValueError):
        TelemetrySampler("perf")
