"""Refuse early when a target's device or backend is not on this host.

Measuring some other hardware and calling it the target would make every number in
the report wrong, so there is no fallback: the error says what is missing and how to
run on the device instead.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy.backends.availability import BACKEND_NEEDS, probe_backend
from deploy.errors import DeviceUnavailable
from deploy.profiles import TargetProfile, name_matches


@dataclass(frozen=True)
class HostInfo:
    """What this host offers, as far as the target check cares."""

    machine: str  # platform.machine(), e.g. x86_64 / aarch64
    jetson_model: str | None  # device-tree model of a Jetson, None when not a Jetson
    gpu_names: tuple[str, ...]  # discrete NVIDIA GPUs by name
    gpu_probe: str  # how the GPUs were listed, or why none could be

    def describe(self) -> str:
        if self.jetson_model:
            return f"{self.jetson_model} ({self.machine})"
        if self.gpu_names:
            return f"{self.machine} with {', '.join(self.gpu_names)}"
        return f"{self.machine} with no NVIDIA GPU"


def detect_jetson(root: str | Path = "/") -> str | None:
    """The Jetson model string (from the device tree), or None when this is not a Jetson.

    `root` lets tests point at a constructed file tree instead of the real /proc and /etc.
    """
    root = Path(root)
    model = ""
    try:
        model = (root / "proc/device-tree/model").read_bytes().replace(b"\x00", b"").decode("utf-8", "replace").strip()
    except OSError:
        pass
    tegra = (root / "etc/nv_tegra_release").is_file()
    if "jetson" in model.lower() or (tegra and "nvidia" in model.lower()):
        return model
    if tegra:
        return model or "NVIDIA Jetson (model unknown)"
    return None


def list_nvidia_gpus() -> tuple[tuple[str, ...], str]:
    """Names of the NVIDIA GPUs via NVML (nvidia-ml-py), else nvidia-smi; never raises."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                names = []
                for i in range(pynvml.nvmlDeviceGetCount()):
                    name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                    names.append(name.decode() if isinstance(name, bytes) else str(name))
                return tuple(names), "nvml"
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:  # pynvml.NVMLError: no driver, no device
            nvml_error = f"NVML init failed ({exc})"
    else:
        nvml_error = "pynvml not installed"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return (), f"{nvml_error}; nvidia-smi not on PATH"
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as exc:
        return (), f"{nvml_error}; nvidia-smi failed ({exc})"
    if out.returncode != 0:
        return (), f"{nvml_error}; nvidia-smi exited {out.returncode}"
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip()), "nvidia-smi"


def detect_host(root: str | Path = "/") -> HostInfo:
    jetson = detect_jetson(root)
    gpus, how = ((), "jetson (integrated GPU)") if jetson else list_nvidia_gpus()
    return HostInfo(machine=platform.machine() or "unknown", jetson_model=jetson, gpu_names=gpus, gpu_probe=how)


def _device_present(profile: TargetProfile, host: HostInfo) -> bool:
    match = profile.device_match
    kind = match["kind"]
    if kind == "cpu":
        return True
    if kind == "jetson":
        if host.jetson_model is None:
            return False
        return "model_contains" not in match or name_matches(match["model_contains"], host.jetson_model)
    if kind == "nvidia-gpu":
        if "name_contains" not in match:
            return bool(host.gpu_names)
        return any(name_matches(match["name_contains"], g) for g in host.gpu_names)
    return False


def _device_wanted(profile: TargetProfile) -> str:
    match = profile.device_match
    if match["kind"] == "jetson":
        return f"a Jetson {match['model_contains']}" if "model_contains" in match else "an NVIDIA Jetson"
    if match["kind"] == "nvidia-gpu":
        return f"an NVIDIA {match['name_contains']} GPU" if "name_contains" in match else "an NVIDIA GPU"
    return "a CPU"


def run_on_device_hint(profile: TargetProfile) -> str:
    """The command to run the same job on the target itself."""
    kind = profile.device_match["kind"]
    if kind == "jetson":
        # systempaths=unconfined: Docker hides /proc/device-tree, which names the Jetson model.
        return (f"docker run --runtime nvidia --security-opt systempaths=unconfined -v $PWD:/work "
                f"edge-compressor:jetson --target {profile.name} ...")
    if kind == "nvidia-gpu":
        return f"docker run --gpus all -v $PWD:/work edge-compressor:cuda --target {profile.name} ..."
    return "pip install onnxruntime"


def check_target_available(profile: TargetProfile, *, host: HostInfo | None = None) -> None:
    """Raise DeviceUnavailable (one line) unless the profile's device and backend are both here."""
    backend_ok, backend_reason = probe_backend(profile.backend)
    if profile.device_match["kind"] == "cpu":
        if not backend_ok:
            raise DeviceUnavailable(
                f"target {profile.name} needs {BACKEND_NEEDS[profile.backend]} ({backend_reason}); "
                f"fix: {run_on_device_hint(profile)}"
            )
        return
    host = host if host is not None else detect_host()
    device_ok = _device_present(profile, host)
    if device_ok and backend_ok:
        return
    problems = []
    if not device_ok:
        problems.append(f"this host is {host.describe()}")
    if not backend_ok:
        problems.append(f"{profile.backend}: {backend_reason}")
    how = "Run on the device" if not device_ok else "Install it, or run in the container"
    raise DeviceUnavailable(
        f"target {profile.name} needs {BACKEND_NEEDS[profile.backend]} on {_device_wanted(profile)}; "
        f"{'; '.join(problems)}. {how}: {run_on_device_hint(profile)}"
    )
