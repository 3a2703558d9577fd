"""`--lock-clocks`: pin a Jetson's CPU, GPU and EMC clocks at their maximum before measuring.

A Jetson's devfreq governor scales the GPU clock with load, so an unlocked run times the ramp-up
as much as the model. `jetson_clocks` (shipped with JetPack) fixes the clocks at the current
nvpmodel mode's maximum until reboot or `jetson_clocks --restore`. We run it only when asked, only on
a Jetson, and only as root; on any other host the flag is refused rather than silently ignored.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deploy.errors import BadInput
from deploy.target_check import detect_host, detect_jetson

_TIMEOUT_S = 60


@dataclass
class ClockLockResult:
    """What `lock_jetson_clocks` ran and what the clocks looked like before and after."""

    jetson_model: str
    command: list[str]
    returncode: int
    output: str  # stdout of the lock call, stripped
    show_before: str | None  # `jetson_clocks --show` before locking; None when it failed
    show_after: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "jetson_model": self.jetson_model,
            "command": list(self.command),
            "returncode": self.returncode,
            "output": self.output,
            "show_before": self.show_before,
            "show_after": self.show_after,
        }


def find_jetson_clocks(root: str | os.PathLike = "/") -> str | None:
    """`jetson_clocks` on PATH, else <root>/usr/bin/jetson_clocks (sudo's PATH may lack it), else None."""
    found = shutil.which("jetson_clocks")
    if found:
        return found
    fallback = Path(root) / "usr/bin/jetson_clocks"
    return str(fallback) if fallback.is_file() and os.access(fallback, os.X_OK) else None


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _show(path: str, runner: Callable[..., Any]) -> str | None:
    try:
        out = runner([path, "--show"], capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def lock_jetson_clocks(
    *,
    root: str | os.PathLike = "/",
    runner: Callable[..., Any] = subprocess.run,
    geteuid: Callable[[], int] | None = None,
) -> ClockLockResult:
    """Run `jetson_clocks` once (with `--show` before and after for the record); BadInput when this is not
    a Jetson, we are not root, the tool is missing, or it fails. Nothing else touches the clocks.

    `root` is the file-system root the Jetson detection reads; `runner` and `geteuid` are injectable for tests.
    """
    model = detect_jetson(root)
    if model is None:
        raise BadInput(
            f"--lock-clocks applies only on a Jetson: this host is {detect_host(root).describe()}; "
            "drop the flag (on a discrete GPU, lock clocks with 'nvidia-smi --lock-gpu-clocks' yourself)"
        )
    uid = (geteuid or getattr(os, "geteuid", lambda: -1))()
    if uid != 0:
        raise BadInput(
            "--lock-clocks needs root to set the Jetson clocks: run with sudo, or in the container "
            "with the needed privileges (docker run --runtime nvidia --privileged ...)"
        )
    path = find_jetson_clocks(root)
    if path is None:
        raise BadInput(
            "--lock-clocks needs jetson_clocks (part of JetPack / nvidia-l4t-tools), not found on PATH "
            f"or at {Path(root) / 'usr/bin/jetson_clocks'}"
        )
    before = _show(path, runner)
    command = [path]
    try:
        done = runner(command, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BadInput(f"--lock-clocks: could not run {path} ({_first_line(str(exc)) or type(exc).__name__})") from None
    if done.returncode != 0:
        why = _first_line(done.stderr) or _first_line(done.stdout) or "no error output"
        raise BadInput(f"--lock-clocks: {path} failed (exit {done.returncode}): {why}")
    return ClockLockResult(
        jetson_model=model,
        command=command,
        returncode=done.returncode,
        output=(done.stdout or "").strip(),
        show_before=before,
        show_after=_show(path, runner),
    )
