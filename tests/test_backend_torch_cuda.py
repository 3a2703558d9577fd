"""torch-cuda backend and the torch program artifact.

The backend's logic runs on any torch device: everything here runs for real on the CPU device;
the CUDA-only paths (events, graph replay, fp16) are tested when a GPU is present and skipped
otherwise.
"""
from __future__ import annotations

import copy
import io
import json
import pathlib
import pickle
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from compressor.channel_plan import ChannelPlan
from compressor.groups import discover_groups
from compressor.models import create_model
from compressor.pruning import apply_plan
from deploy.backends.base import LayerProfile, Measurement, fixed_input
from deploy.backends.torch_cuda import TorchCudaBackend, create_torch_cuda_backend
from deploy.errors import BadInput, DeviceUnavailable
from deploy.torch_program import load_program, read_program_info, save_program

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: torch.cuda.is_available() is False")
SHAPE = (1, 3, 16, 16)


def _eager(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """One intra-op thread while these tests run: on a shared, busy CPU, torch's thread pool
    waiting on a descheduled worker turns milliseconds into seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """resnet20 and a physically pruned copy (half of every prunable group), each saved as .pt2
    next to a (placeholder) .onnx path the way the pipeline writes them."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("programs")
    full = create_model("resnet20", num_classes=10, in_channels=3).eval()
    x = torch.randn(*SHAPE)
    plan = ChannelPlan({g.name: list(range(max(1, g.channels // 2))) for g in discover_groups(full, x) if g.prunable})
    pruned = apply_plan(copy.deepcopy(full), x, plan).eval()
    paths = {}
    for name, model in (("full", full), ("pruned", pruned)):
        paths[name] = save_program(model, x, folder / f"{name}.pt2")
    return {"full": full, "pruned": pruned, "paths": paths, "folder": folder}


# -- the program artifact ----------------------------------------------------------------------
def test_program_round_trip_dynamic_batch(nets):
    path = nets["paths"]["full"]
    info = read_program_info(path)
    assert info.dynamic_batch and info.input_shape == ["batch", 3, 16, 16]
    module = load_program(path)
    for batch in (1, 3):  # traced at batch 2 (batch-1 examples are specialised by torch.export)
        x = fixed_input((batch, 3, 16, 16), seed=batch)
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, _eager(nets["full"], x), rtol=1e-5, atol=1e-5)
    assert not list(nets["folder"].glob(".*.tmp"))  # atomic write left nothing behind


def test_static_batch_program_rejects_other_batches(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    path = save_program(model, torch.randn(2, 3, 8, 8), tmp_path / "static.pt2", dynamic_batch=False)
    assert read_program_info(path).input_shape == [2, 3, 8, 8]
    runner = TorchCudaBackend(device="cpu").create_runner(path)
    x = fixed_input((2, 3, 8, 8))
    np.testing.assert_allclose(runner.run(x), _eager(model, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(BadInput, match="expects input shape"):
        runner.run(fixed_input((3, 3, 8, 8)))
    split = fixed_input((5, 3, 8, 8), seed=2)  # 2 + 2 + 1 (zero-padded to the static batch)
    np.testing.assert_allclose(runner.run_batches(split, 2), _eager(model, split), rtol=1e-5, atol=1e-5)


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """Copy a .pt2 archive entry by entry, letting `edit(relative_name, bytes)` change entries."""
    out = io.BytesIO()
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(out, "w") as new:
        for name in archive.namelist():
            rel = name.split("/", 1)[1]
            new.writestr(name, edit(rel, archive.read(name)))
    dst.write_bytes(out.getvalue())
    return dst


class _Touch:
    """A pickle that creates a file when unpickled: what a hostile .pt2 could carry."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_load_refuses_missing_corrupt_and_foreign_files(nets, tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_program(tmp_path / "absent.pt2")
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive at all")
    with pytest.raises(BadInput, match="not a readable torch program"):
        load_program(garbage)
    # A genuine torch.export file that this tool did not write (no metadata entry).
    plain = tmp_path / "plain.pt2"
    model = nn.Sequential(nn.Conv2d(3, 2, 1)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 4, 4),)), plain)
    with pytest.raises(BadInput, match="not a torch program written by this tool"):
        load_program(plain)


def test_load_refuses_tampered_programs_without_unpickling(nets, tmp_path):
    src = nets["paths"]["full"]
    flag = tmp_path / "unpickled"

    def evil_sample(rel, data):
        return pickle.dumps(_Touch(flag)) if rel == "data/sample_inputs/model.pt" else data

    def pickled_weight(rel, data):
        if rel != "data/weights/model_weights_config.json":
            return data
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    def guard_code(rel, data):
        if rel != "models/model.json":
            return data
        program = json.loads(data)
        program["guards_code"] = ["__import__('os').getpid() > 0"]
        return json.dumps(program).encode()

    def sympy_eval(rel, data):  # shape strings reach sympy.sympify, i.e. eval
        if rel != "models/model.json":
            return data
        return data.decode().replace("Symbol('s", "exec(chr(49)) + Symbol('s", 1).encode()

    cases = ((evil_sample, "pickled sample inputs"), (pickled_weight, "pickled object"),
             (guard_code, "guard code"), (sympy_eval, "shape expression"))
    for i, (edit, reason) in enumerate(cases):
        bad = _rewrite(src, tmp_path / f"bad{i}.pt2", edit)
        with pytest.raises(BadInput, match=f"not a torch program written by this tool .*{reason}"):
            load_program(bad)
        with pytest.raises(BadInput):
            TorchCudaBackend(device="cpu").create_runner(bad)
    assert not flag.exists()
    # The untouched file still loads: the checks accept what save_program writes.
    assert isinstance(load_program(_rewrite(src, tmp_path / "same.pt2", lambda rel, data: data)), nn.Module)


# -- runner and measurement on the CPU device ------------------------------------------------------
def test_runner_matches_eager_and_copies_each_input_once(nets):
    onnx_path = nets["paths"]["full"].with_suffix(".onnx")  # the .pt2 next to it is what runs
    runner = TorchCudaBackend(device="cpu").create_runner(onnx_path)
    assert runner.input_shape == ["batch", 3, 16, 16]
    x = fixed_input((2, 3, 16, 16), seed=3)
    out = runner.run(x)
    assert out.dtype == np.float32 and out.shape == (2, 10)
    np.testing.assert_allclose(out, _eager(nets["full"], x), rtol=1e-5, atol=1e-5)
    first = runner.prepare(x)
    assert runner.prepare(x) is first and runner.prepare(x.copy()) is first  # one device buffer per shape
    assert first.is_contiguous(memory_format=torch.channels_last)
    x[0] += 1.0  # changed in place: the cache must notice
    np.testing.assert_allclose(runner.run(x), _eager(nets["full"], x), rtol=1e-5, atol=1e-5)
    with pytest.raises(BadInput):
        runner.run(fixed_input((2, 3, 8, 8)))
    split = fixed_input((7, 3, 16, 16), seed=4)
    np.testing.assert_allclose(runner.run_batches(split, 3), _eager(nets["full"], split), rtol=1e-5, atol=1e-5)


def test_measure_on_cpu_records_settings(nets):
    backend = TorchCudaBackend(precision="fp16", cuda_graph=True, channels_last=True, device="cpu")
    m = backend.measure(nets["paths"]["full"], SHAPE, warmup=3, iterations=15, max_cv=10.0)
    assert isinstance(m, Measurement) and m.backend == "torch-cuda" and m.device == backend.device_name()
    lat = m.latency
    assert lat.n == 15 and lat.warmup == 3 and len(lat.samples_ms) == 15
    assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
    s = m.settings
    assert s["device"] == "cpu" and s["timing"] == "wall-clock" and s["stream"] == "none (cpu)"
    assert s["precision"] == "fp32" and s["cuda_graph"] is False and s["channels_last"] is True
    assert set(s["not_applied"]) == {"precision", "cuda_graph"}
    assert s["input_shape"] == list(SHAPE) and s["dynamic_batch"] is True
    json.dumps(m.to_report())
    versions = backend.versions()
    assert versions["torch"] == torch.__version__ and {"cuda", "cudnn"} <= set(versions)


def test_build_engine_places_the_program(nets, tmp_path):
    backend = TorchCudaBackend(device="cpu")
    onnx_path = nets["paths"]["full"].with_suffix(".onnx")
    assert backend.engine_suffix == ".pt2" and TorchCudaBackend.needs_torch_program is True
    engine = backend.build_engine(onnx_path, tmp_path / "deployed.pt2", SHAPE)
    assert engine.read_bytes() == nets["paths"]["full"].read_bytes()
    assert backend.build_engine(onnx_path, nets["paths"]["full"], SHAPE) == nets["paths"]["full"]


# -- per-layer profile ---------------------------------------------------------------------------
def test_profile_layers_stable_across_widths(nets):
    backend = TorchCudaBackend(device="cpu")
    profiles = {name: backend.profile_layers(nets["paths"][name], SHAPE, warmup=1, runs=3) for name in ("full", "pruned")}
    for name, profile in profiles.items():
        assert isinstance(profile, LayerProfile) and profile.source == "torch-profiler" and profile.runs == 3
        assert profile.total_ms > 0 and all(layer.median_ms >= 0 for layer in profile.layers)
        modules = dict(nets[name].named_modules())
        convs = [layer for layer in profile.layers if layer.op == "conv2d"]
        conv_modules = [n for n, mod in modules.items() if isinstance(mod, nn.Conv2d)]
        assert sorted(layer.name for layer in convs) == sorted(conv_modules)  # one LayerTime per conv
        for layer in convs:
            conv = modules[layer.name]
            assert (layer.in_channels, layer.out_channels) == (conv.in_channels, conv.out_channels)
            assert layer.input_shapes[1] == list(conv.weight.shape) and layer.output_shapes[0][1] == conv.out_channels
        fc = next(layer for layer in profile.layers if layer.op == "linear")
        assert (fc.in_channels, fc.out_channels) == (modules["fc"].in_features, modules["fc"].out_features)
        assert {layer.op for layer in profile.layers} >= {"conv2d", "batch_norm", "relu", "add", "adaptive_avg_pool2d"}
    full, pruned = profiles["full"].layers, profiles["pruned"].layers
    assert [(layer.name, layer.op) for layer in full] == [(layer.name, layer.op) for layer in pruned]
    assert len({layer.name for layer in full}) == len(full)  # names are unique
    widths = [(a.in_channels, a.out_channels) != (b.in_channels, b.out_channels) for a, b in zip(full, pruned)]
    assert any(widths)  # the pruned variant really has other widths


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"precision": "int8"}, "does not support int8"),
    ({"precision": "bf16"}, "precision must be one of"),
    ({"cuda_graph": "yes"}, "cuda_graph must be true or false"),
    ({"channels_last": 1}, "channels_last must be true or false"),
    ({"device": "tpu"}, "device must be"),
    ({"device": 0}, "device must be"),
    ({"workspace_mb": 64}, "unknown torch-cuda option"),
])
def test_bad_options(options, message):
    with pytest.raises(BadInput, match=message):
        create_torch_cuda_backend(**options)


def test_missing_or_wrong_program_path(tmp_path):
    backend = TorchCudaBackend(device="cpu")
    with pytest.raises(BadInput, match=r"model\.pt2 is missing"):
        backend.create_runner(tmp_path / "model.onnx")
    with pytest.raises(BadInput, match="not found"):
        backend.create_runner(tmp_path / "model.pt2")
    with pytest.raises(BadInput, match="runs .pt2 programs"):
        backend.create_runner(tmp_path / "model.engine")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a host without CUDA")
def test_cuda_device_unavailable_here(nets):
    backend = TorchCudaBackend()  # device="cuda"
    assert backend.is_available()[0] is False
    with pytest.raises(DeviceUnavailable, match="torch-cuda"):
        backend.create_runner(nets["paths"]["full"])


# -- CUDA only -----------------------------------------------------------------------------------
@needs_cuda
def test_cuda_event_timing(nets):
    backend = TorchCudaBackend(precision="fp32", cuda_graph=False, device="cuda")
    m = backend.measure(nets["paths"]["full"], SHAPE, warmup=5, iterations=30, max_cv=10.0)
    s = m.settings
    assert s["timing"] == "cuda-events" and s["stream"].startswith("non-default") and "not_applied" not in s
    wall = s["wall_clock_latency_ms"]
    assert m.latency.n == 30 and wall["n"] == 30
    assert 0 < m.latency.median_ms <= wall["median"] * 1.05  # device time fits inside the blocking call


@needs_cuda
def test_cuda_graph_replay_equals_eager(nets):
    x = fixed_input((2, 3, 16, 16), seed=5)
    eager = TorchCudaBackend(precision="fp32", cuda_graph=False).create_runner(nets["paths"]["full"])
    graph = TorchCudaBackend(precision="fp32", cuda_graph=True).create_runner(nets["paths"]["full"])
    assert graph.settings["cuda_graph"] is True
    np.testing.assert_allclose(graph.run(x), eager.run(x), rtol=1e-4, atol=1e-4)
    y = fixed_input((2, 3, 16, 16), seed=6)  # new content through the same static buffer
    np.testing.assert_allclose(graph.run(y), eager.run(y), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(graph.run(y), _eager(nets["full"], y), rtol=1e-3, atol=1e-3)


@needs_cuda
def test_cuda_fp16_close_to_fp32(nets):
    x = fixed_input((4, 3, 16, 16), seed=7)
    fp16 = TorchCudaBackend(precision="fp16").create_runner(nets["paths"]["full"])
    assert fp16.settings["precision"] == "fp16" and fp16.prepare(x).dtype == torch.float16
    ref = _eager(nets["full"], x)
    np.testing.assert_allclose(fp16.run(x), ref, rtol=2e-2, atol=2e-2 * float(np.abs(ref).max()))


@needs_cuda
def test_cuda_profile_layers(nets):
    profile = TorchCudaBackend(precision="fp16").profile_layers(nets["paths"]["pruned"], SHAPE, warmup=3, runs=5)
    convs = [layer for layer in profile.layers if layer.op == "conv2d"]
    assert convs and all(layer.median_ms > 0 for layer in convs) and profile.total_ms > 0
