"""What the host CPU is: model, cores, frequency. Read from /proc and /sys, never raising.

Shared by the CPU backend (thread count, device name) and telemetry (environment).
`proc_root` / `sysfs_root` let tests point at constructed files.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def usable_cores() -> int:
    """CPUs this process may run on (the affinity mask; a container's cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpuinfo_blocks(proc_root: str | Path) -> list[dict[str, str]]:
    try:
        text = (Path(proc_root) / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    blocks, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip().lower(), value.strip())
    if current:
        blocks.append(current)
    return blocks


def cpu_model(proc_root: str | Path = "/proc") -> str:
    """Marketing name of the CPU ("model name" in /proc/cpuinfo), else the best we can find."""
    for block in _cpuinfo_blocks(proc_root):
        for key in ("model name", "hardware", "cpu model", "processor"):
            value = block.get(key, "")
            if value and not value.isdigit():
                return value
    return platform.processor() or platform.machine() or "unknown CPU"


def physical_cores(proc_root: str | Path = "/proc") -> int:
    """Physical cores among the CPUs this process may use (SMT siblings counted once)."""
    allowed: set[int] | None
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = None
    cores = set()
    for block in _cpuinfo_blocks(proc_root):
        try:
            cpu = int(block["processor"])
            core = (block["physical id"], block["core id"])
        except (KeyError, ValueError):
            continue
        if allowed is None or cpu in allowed:
            cores.add(core)
    n = len(cores) if cores else usable_cores()
    return max(1, min(n, usable_cores()))


def read_cpu_frequency(sysfs_root: str | Path = "/sys", cpu: int = 0) -> dict[str, Any]:
    """cpufreq of one CPU in MHz plus the governor; {"unavailable": why} when not exposed (VMs)."""
    folder = Path(sysfs_root) / f"devices/system/cpu/cpu{cpu}/cpufreq"
    out: dict[str, Any] = {}
    for key, name in (("cpu_cur_mhz", "scaling_cur_freq"), ("cpu_min_mhz", "scaling_min_freq"), ("cpu_max_mhz", "scaling_max_freq")):
        try:
            out[key] = int((folder / name).read_text().strip()) / 1000.0  # kHz -> MHz
        except (OSError, ValueError):
            pass
    try:
        out["cpu_governor"] = (folder / "scaling_governor").read_text().strip()
    except OSError:
        pass
    if not out:
        out["unavailable"] = f"{folder} not readable"
    return out
