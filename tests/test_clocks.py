"""--lock-clocks: refused off a Jetson and without root; on a (constructed) Jetson runs a fake jetson_clocks
script exactly once. A real jetson_clocks is never called: PATH holds only the fake's folder and the
root's /usr/bin is the constructed tree's."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from deploy.clocks import ClockLockResult, find_jetson_clocks, lock_jetson_clocks
from deploy.errors import BadInput

MODEL = "NVIDIA Jetson AGX Orin Developer Kit"


def _jetson_root(root: Path) -> Path:
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_bytes(MODEL.encode() + b"\x00")
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    return root


def _fake_jetson_clocks(folder: Path, *, fail: bool = False) -> tuple[Path, Path]:
    """A jetson_clocks stand-in: logs each call's arguments; --show prints the state; no args locks."""
    folder.mkdir(parents=True, exist_ok=True)
    log, state = folder / "calls.log", folder / "state"
    lock = 'echo "NVIDIA clocks: cannot write /sys/devices/gpu.0/devfreq" >&2; exit 3' if fail else \
        f'echo locked > "{state}"; echo "clocks set"'
    script = folder / "jetson_clocks"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "args:$*" >> "{log}"\n'
        'if [ "$1" = "--show" ]; then\n'
        f'  if [ -f "{state}" ]; then echo "GPU MinFreq=1300500000 MaxFreq=1300500000"; '
        'else echo "GPU MinFreq=306000000 MaxFreq=1300500000"; fi\n'
        "  exit 0\n"
        "fi\n"
        f"{lock}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return script, log


def test_refused_on_a_non_jetson_host(tmp_path, monkeypatch):
    script, log = _fake_jetson_clocks(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(script.parent))
    with pytest.raises(BadInput, match=r"^--lock-clocks applies only on a Jetson: this host is "):
        lock_jetson_clocks(root=tmp_path / "plain-host", geteuid=lambda: 0)
    assert not log.exists()  # nothing was run


def test_locks_once_on_a_jetson(tmp_path, monkeypatch):
    root = _jetson_root(tmp_path / "root")
    script, log = _fake_jetson_clocks(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(script.parent))
    result = lock_jetson_clocks(root=root, geteuid=lambda: 0)

    assert isinstance(result, ClockLockResult)
    calls = log.read_text().splitlines()
    assert calls == ["args:--show", "args:", "args:--show"]  # the lock itself exactly once, no other args
    assert result.command == [str(script)] and result.returncode == 0
    assert result.jetson_model == MODEL and result.output == "clocks set"
    assert "MinFreq=306000000" in result.show_before and "MinFreq=1300500000" in result.show_after
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_found_under_root_usr_bin_when_not_on_path(tmp_path, monkeypatch):
    root = _jetson_root(tmp_path / "root")
    script, log = _fake_jetson_clocks(root / "usr/bin")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_jetson_clocks(root) == str(script)
    assert lock_jetson_clocks(root=root, geteuid=lambda: 0).command == [str(script)]
    assert log.read_text().splitlines().count("args:") == 1


def test_failing_command_is_bad_input_with_its_stderr(tmp_path, monkeypatch):
    root = _jetson_root(tmp_path / "root")
    script, log = _fake_jetson_clocks(tmp_path / "bin", fail=True)
    monkeypatch.setenv("PATH", str(script.parent))
    with pytest.raises(BadInput, match=r"failed \(exit 3\): NVIDIA clocks: cannot write /sys/devices/gpu.0/devfreq$"):
        lock_jetson_clocks(root=root, geteuid=lambda: 0)
    assert log.read_text().splitlines().count("args:") == 1


def test_not_root_is_refused_before_running_anything(tmp_path, monkeypatch):
    root = _jetson_root(tmp_path / "root")
    script, log = _fake_jetson_clocks(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(script.parent))
    with pytest.raises(BadInput, match="sudo") as info:
        lock_jetson_clocks(root=root, geteuid=lambda: 1000)
    assert "container" in str(info.value) and "\n" not in str(info.value)
    assert not log.exists()


def test_missing_tool_is_bad_input(tmp_path, monkeypatch):
    root = _jetson_root(tmp_path / "root")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BadInput, match="jetson_clocks .*not found"):
        lock_jetson_clocks(root=root, geteuid=lambda: 0)
