"""What the hardware was doing while we measured: versions, clocks, power, throttling.

A latency number is only as good as the conditions it was taken under; a GPU that hit
its power cap or a Jetson in the wrong nvpmodel mode gives numbers that will not repeat.
The sampler records those conditions next to the measurement. A missing source (no
pynvml, no Jetson sysfs) never raises: the result says what was unavailable.
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Protocol

from deploy.cpu_info import cpu_model, physical_cores, read_cpu_frequency, usable_cores

SOURCES = ("none", "nvml", "jetson")

# NVML clocks event (formerly "throttle") reason bits; stable values from nvml.h.
NVML_CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
THROTTLING_REASONS = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
)
# Known Jetson GPU devfreq nodes (Orin: ga10b, Xavier: gv11b); any devfreq name with "gpu" also counts.
JETSON_GPU_DEVFREQ = ("17000000.ga10b", "17000000.gv11b", "17000000.gp10b", "57000000.gpu")
# Below this fraction of its maximum during a run, the Jetson GPU clock is reported as not at full speed.
_JETSON_CLOCK_FRACTION = 0.95


def _module_version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return None


def collect_environment(backend: Any = None, *, sysfs_root: str | Path = "/sys") -> dict[str, Any]:
    """Software versions and host facts for the report's `environment` section."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "numpy": _module_version("numpy"),
        "torch": _module_version("torch"),
        "onnx": _module_version("onnx"),
        "onnxruntime": _module_version("onnxruntime"),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "physical_cores": physical_cores(),
        "cpu_frequency": read_cpu_frequency(sysfs_root),
    }
    if backend is not None:
        entry: dict[str, Any] = {"name": getattr(backend, "name", str(backend))}
        for key, method in (("versions", "versions"), ("device", "device_name")):
            try:
                entry[key] = getattr(backend, method)()
            except Exception as exc:  # environment collection must not break a finished job
                entry[key] = f"unavailable ({exc})"
        env["backend"] = entry
    return env


def decode_clock_event_reasons(mask: int) -> list[str]:
    """Names of the NVML clocks event reason bits set in `mask` (unknown bits as hex)."""
    names = [name for bit, name in NVML_CLOCK_EVENT_REASONS.items() if mask & bit]
    unknown = mask & ~sum(NVML_CLOCK_EVENT_REASONS)
    if unknown:
        names.append(f"unknown_0x{unknown:x}")
    return names


def parse_nvpmodel(text: str) -> tuple[str | None, int | None]:
    """(mode name, mode id) from `nvpmodel -q` output ("NV Power Mode: MAXN" then "0")."""
    name, mode_id = None, None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.lower().startswith("nv power mode"):
            name = line.split(":", 1)[1].strip() if ":" in line else None
            if i + 1 < len(lines) and lines[i + 1].isdigit():
                mode_id = int(lines[i + 1])
            break
    return name or None, mode_id


class _Unavailable(Exception):
    """A telemetry source cannot be opened on this host."""


class _Source(Protocol):
    def snapshot(self, full: bool) -> dict[str, Any]: ...

    def close(self) -> None: ...


class _NoneSource:
    """No device telemetry: the CPU frequency, before and after."""

    def __init__(self, sysfs_root: Path):
        self.sysfs_root = sysfs_root

    def snapshot(self, full: bool) -> dict[str, Any]:
        return read_cpu_frequency(self.sysfs_root)

    def close(self) -> None:
        pass


class _NvmlSource:
    """NVIDIA GPU via NVML (pip install nvidia-ml-py)."""

    def __init__(self, device_index: int):
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            raise _Unavailable("pynvml not installed (pip install nvidia-ml-py)") from None
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            raise _Unavailable(f"NVML init failed ({exc})") from None
        self.nvml = pynvml
        try:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception as exc:
            pynvml.nvmlShutdown()
            raise _Unavailable(f"no NVIDIA GPU {device_index} ({exc})") from None
        self.reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )

    def _read(self, out: dict[str, Any], key: str, fn, *args, scale: float = 1.0) -> None:
        try:
            value = fn(self.handle, *args)
        except Exception:
            return  # not supported on this GPU / driver: leave the field out
        if isinstance(value, bytes):
            value = value.decode()
        out[key] = value * scale if isinstance(value, (int, float)) and scale != 1.0 else value

    def snapshot(self, full: bool) -> dict[str, Any]:
        n = self.nvml
        out: dict[str, Any] = {}
        if full:
            self._read(out, "name", n.nvmlDeviceGetName)
            try:
                drv = n.nvmlSystemGetDriverVersion()
                out["driver"] = drv.decode() if isinstance(drv, bytes) else drv
            except Exception:
                pass
            self._read(out, "sm_clock_max_mhz", n.nvmlDeviceGetMaxClockInfo, n.NVML_CLOCK_SM)
            self._read(out, "power_limit_w", n.nvmlDeviceGetEnforcedPowerLimit, scale=1e-3)
        self._read(out, "sm_clock_mhz", n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_SM)
        self._read(out, "mem_clock_mhz", n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_MEM)
        self._read(out, "temperature_c", n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU)
        self._read(out, "power_w", n.nvmlDeviceGetPowerUsage, scale=1e-3)
        try:
            out["utilization_gpu_pct"] = n.nvmlDeviceGetUtilizationRates(self.handle).gpu
        except Exception:
            pass
        if self.reasons_fn is not None:
            try:
                out["clock_event_reasons"] = decode_clock_event_reasons(int(self.reasons_fn(self.handle)))
            except Exception:
                pass
        return out

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def find_jetson_gpu_devfreq(sysfs_root: str | Path) -> Path | None:
    folder = Path(sysfs_root) / "class/devfreq"
    if not folder.is_dir():
        return None
    entries = sorted(folder.iterdir())
    for known in JETSON_GPU_DEVFREQ:
        for entry in entries:
            if entry.name == known:
                return entry
    for entry in entries:
        if "gpu" in entry.name.lower():
            return entry
    return None


class _JetsonSource:
    """Jetson integrated GPU via devfreq sysfs, thermal zones, and `nvpmodel -q`."""

    def __init__(self, sysfs_root: Path, nvpmodel: str | None):
        self.devfreq = find_jetson_gpu_devfreq(sysfs_root)
        if self.devfreq is None:
            raise _Unavailable(f"no Jetson GPU devfreq under {Path(sysfs_root) / 'class/devfreq'}")
        self.thermal = Path(sysfs_root) / "class/thermal"
        self.nvpmodel = nvpmodel

    def snapshot(self, full: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, name in (("gpu_cur_mhz", "cur_freq"), ("gpu_min_mhz", "min_freq"), ("gpu_max_mhz", "max_freq")):
            text = _read_text(self.devfreq / name)
            if text and text.isdigit():
                out[key] = int(text) / 1e6  # Hz -> MHz
        if full:
            governor = _read_text(self.devfreq / "governor")
            if governor:
                out["gpu_governor"] = governor
            if self.nvpmodel:
                try:
                    q = subprocess.run([self.nvpmodel, "-q"], capture_output=True, text=True, timeout=10)
                    name, mode_id = parse_nvpmodel(q.stdout)
                    if name is not None:
                        out["nvpmodel_mode"] = name
                    if mode_id is not None:
                        out["nvpmodel_id"] = mode_id
                except (OSError, subprocess.SubprocessError):
                    pass
        if self.thermal.is_dir():
            for zone in sorted(self.thermal.glob("thermal_zone*")):
                kind, temp = _read_text(zone / "type"), _read_text(zone / "temp")
                if kind and temp and temp.lstrip("-").isdigit():
                    out[f"temp_{kind.lower().replace('-', '_')}_c"] = int(temp) / 1000.0  # millidegrees
        return out

    def close(self) -> None:
        pass


class TelemetrySampler:
    """Context manager: snapshot before, sample in a background thread during, snapshot after.

    The `none` source takes only the two snapshots (no thread to disturb a CPU measurement).
    """

    def __init__(
        self,
        source: str = "none",
        interval_s: float = 0.05,
        *,
        sysfs_root: str | Path = "/sys",
        device_index: int = 0,
        expected_power_mode: str | None = None,
        nvpmodel: str | None = None,
    ):
        if source not in SOURCES:
            raise ValueError(f"telemetry source must be one of {', '.join(SOURCES)} (got {source!r})")
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.source = source
        self.interval_s = interval_s
        self.sysfs_root = Path(sysfs_root)
        self.device_index = device_index
        self.expected_power_mode = expected_power_mode
        self.nvpmodel = nvpmodel if nvpmodel is not None else shutil.which("nvpmodel")
        self._impl: _Source | None = None
        self._unavailable: str | None = None
        self._before: dict[str, Any] = {}
        self._after: dict[str, Any] = {}
        self._samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> _Source:
        if self.source == "nvml":
            return _NvmlSource(self.device_index)
        if self.source == "jetson":
            return _JetsonSource(self.sysfs_root, self.nvpmodel)
        return _NoneSource(self.sysfs_root)

    def __enter__(self) -> "TelemetrySampler":
        try:
            self._impl = self._open()
        except _Unavailable as exc:
            self._unavailable = str(exc)
            return self
        self._before = self._impl.snapshot(full=True)
        if self.source != "none":
            self._thread = threading.Thread(target=self._loop, name=f"telemetry-{self.source}", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        assert self._impl is not None
        while not self._stop.wait(self.interval_s):
            try:
                self._samples.append(self._impl.snapshot(full=False))
            except Exception:  # a failing read must not kill the measurement
                return

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._impl is not None:
            try:
                self._after = self._impl.snapshot(full=True)
            finally:
                self._impl.close()

    def result(self) -> dict[str, Any]:
        """{source, available, before, after, samples (min/max/mean per numeric field), throttled, reasons, ...}."""
        out: dict[str, Any] = {
            "source": self.source,
            "available": self._unavailable is None,
            "before": self._before,
            "after": self._after,
            "n_samples": len(self._samples),
            "samples": _summarise_numeric([self._before, *self._samples, self._after]),
        }
        if self._unavailable is not None:
            out["unavailable"] = self._unavailable
        reasons, warnings = self._judge()
        out["throttled"] = bool(reasons)
        out["reasons"] = reasons
        out["warnings"] = warnings
        return out

    def _judge(self) -> tuple[list[str], list[str]]:
        """Throttling reasons (measurement conditions degraded) and warnings (setup worth fixing)."""
        reasons: list[str] = []
        warnings: list[str] = []
        snapshots = [self._before, *self._samples, self._after]
        if self.source == "nvml":
            for snap in snapshots:
                for name in snap.get("clock_event_reasons", []):
                    if name in THROTTLING_REASONS and name not in reasons:
                        reasons.append(name)
        elif self.source == "jetson":
            during = [s["gpu_cur_mhz"] for s in self._samples if "gpu_cur_mhz" in s]
            top = max((s["gpu_max_mhz"] for s in snapshots if "gpu_max_mhz" in s), default=None)
            if during and top:
                mean = sum(during) / len(during)
                if mean < _JETSON_CLOCK_FRACTION * top:
                    reasons.append(f"gpu_clock_below_max (mean {mean:.0f} of {top:.0f} MHz during the run)")
            lo = self._before.get("gpu_min_mhz")
            if lo is not None and top is not None and lo < top:
                warnings.append("GPU clock not locked (min < max); run 'sudo jetson_clocks' for stable timings")
            mode = self._before.get("nvpmodel_mode")
            if self.expected_power_mode and mode and mode != self.expected_power_mode:
                warnings.append(f"nvpmodel mode is {mode}, the profile expects {self.expected_power_mode}")
        return reasons, warnings


def _summarise_numeric(snapshots: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    values: dict[str, list[float]] = {}
    for snap in snapshots:
        for key, val in snap.items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                values.setdefault(key, []).append(float(val))
    return {k: {"min": min(v), "max": max(v), "mean": sum(v) / len(v)} for k, v in values.items()}
