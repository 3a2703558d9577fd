"""The deployment sidecar, from a real ONNX Runtime CPU measurement of a tiny exported model."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from datetime import datetime, timezone

import onnxruntime
import pytest
import torch
from torch import nn

from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU
from deploy.errors import BadInput
from deploy.onnx_export import export_onnx
from deploy.sidecar import cuda_compute_capability, deployment_sidecar, sha256_file, write_sidecar

SHAPE = (1, 3, 8, 8)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()
    folder = tmp_path_factory.mktemp("art")
    onnx_path = export_onnx(model, torch.randn(*SHAPE), folder / "model.onnx")
    backend = OnnxRuntimeCPU(intra_op_threads=1)
    return backend, backend.measure(onnx_path, SHAPE, warmup=2, iterations=10), onnx_path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sidecar_fields_for_onnxruntime_cpu(measured):
    backend, m, onnx_path = measured
    before = datetime.now(timezone.utc).replace(microsecond=0)
    car = deployment_sidecar(backend=backend, measurement=m, precision="fp32", input_shape=SHAPE,
                             onnx_path=onnx_path, engine_path=None)
    assert car["schema_version"] == 1
    assert car["tool"] == {"name": "edge-compressor", "version": importlib.metadata.version("edge-compressor")}
    assert car["backend"] == {"name": "onnxruntime-cpu", "versions": {"onnxruntime": onnxruntime.__version__}}
    assert car["device"]["name"] == backend.device_name() and car["device"]["name"]
    assert car["device"]["compute_capability"] is None
    assert car["device"]["compute_capability_note"] == "not a CUDA device"
    assert car["precision"] == "fp32" and car["input_shape"] == [1, 3, 8, 8]
    lat = car["latency_ms"]
    assert lat["measured"] is True
    assert lat["median"] == m.latency.median_ms and lat["p90"] == m.latency.p90_ms
    assert lat["p99"] == m.latency.p99_ms and lat["cv"] == m.latency.cv
    assert 0 < lat["median"] <= lat["p90"] <= lat["p99"]
    assert all(isinstance(lat[k], float) for k in ("median", "p90", "p99", "cv"))
    assert lat["throttled"] is False and isinstance(lat["noisy"], bool) and lat["n"] >= 10
    assert car["files"] == {"onnx": "model.onnx", "engine": None, "timing_cache": None}
    assert car["sha256"] == {"onnx": _digest(onnx_path), "engine": None, "timing_cache": None}
    created = datetime.fromisoformat(car["created_at"])
    assert created.utcoffset().total_seconds() == 0 and before <= created <= datetime.now(timezone.utc)


def test_engine_and_timing_cache_hashes(measured, tmp_path):
    backend, m, onnx_path = measured
    engine = tmp_path / "model.plan"
    engine.write_bytes(bytes(range(256)) * 5000)  # > one 1 MiB read chunk
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00cache\xff")
    car = deployment_sidecar(backend=backend, measurement=m, precision="fp16", input_shape=list(SHAPE),
                             onnx_path=onnx_path, engine_path=engine, timing_cache_path=cache)
    assert car["sha256"]["engine"] == _digest(engine) == sha256_file(engine)
    assert car["sha256"]["timing_cache"] == _digest(cache)
    assert car["files"] == {"onnx": "model.onnx", "engine": "model.plan", "timing_cache": "timing.cache"}
    assert car["sha256"]["engine"] != car["sha256"]["onnx"]


def test_json_round_trip_and_atomic_write(measured, tmp_path):
    backend, m, onnx_path = measured
    car = deployment_sidecar(backend=backend, measurement=m, precision="fp32", input_shape=SHAPE,
                             onnx_path=onnx_path, engine_path=None)
    out = tmp_path / "deploy" / "model.sidecar.json"
    assert write_sidecar(out, car) == out
    assert json.loads(out.read_text()) == car
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.sidecar.json"]  # no temp file left
    car2 = {**car, "precision": "fp16"}
    write_sidecar(out, car2)  # overwrite in place
    assert json.loads(out.read_text())["precision"] == "fp16"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.sidecar.json"]


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "s.json"
    with pytest.raises(ValueError):
        write_sidecar(out, {"latency": float("nan")})  # not valid JSON: refused, nothing written
    assert list(tmp_path.iterdir()) == []


def test_refuses_unmeasured_or_inconsistent(measured, tmp_path):
    backend, m, onnx_path = measured
    common = dict(backend=backend, precision="fp32", onnx_path=onnx_path, engine_path=None)
    with pytest.raises(BadInput, match="only for a measured artifact"):
        deployment_sidecar(measurement=None, input_shape=SHAPE, **common)
    with pytest.raises(BadInput, match=r"measurement was taken at input shape \[1, 3, 8, 8\]"):
        deployment_sidecar(measurement=m, input_shape=(2, 3, 8, 8), **common)
    with pytest.raises(BadInput, match="does not exist"):
        deployment_sidecar(measurement=m, input_shape=SHAPE, **{**common, "engine_path": tmp_path / "no.plan"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_compute_capability_without_cuda_says_why():
    capability, why = cuda_compute_capability()
    assert capability is None and why
