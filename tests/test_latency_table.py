"""The latency model: group identification from channel counts, fit on real profiles, persistence."""
import json

import numpy as np
import pytest
import torch

from compressor.channel_grid import ChannelGrid
from compressor.cost_model import CostModel
from compressor.errors import BadInput
from compressor.groups import discover_groups
from compressor.latency_profiling import (TableRequest, build_latency_model, cache_dir, check_table_matches,
                                          key_digest, load_table_file, prune_to, save_table, table_key, variant_plans)
from compressor.latency_table import CorrectedLatency, LatencyTable, _identify
from compressor.models import create_model
from compressor.pipeline import minimum_keep
from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU
from deploy.onnx_export import export_onnx

KEEPS = np.array([[16, 32], [4, 9], [7, 20], [12, 27], [15, 13]], dtype=float)


def test_identify_finds_the_group_and_the_backends_padding():
    exact = _identify([32, 9, 20, 27, 13], KEEPS)
    assert (exact.group, exact.step, exact.scale) == (1, 1, 1)
    padded = _identify([32, 16, 32, 32, 16], KEEPS)  # ceil(k / 16) * 16 of group 1
    assert (padded.group, padded.step, padded.step_source) == (1, 16, "shape")
    assert padded.value(np.array([16.0, 17.0])) == 32
    mixed = _identify([32, 9, 32, 27, 16], KEEPS)  # padded to 16 at some widths only
    assert (mixed.group, mixed.step, mixed.block) == (1, 1, 16)
    flatten = _identify([64, 18, 40, 54, 26], KEEPS)  # 2 x group 1 (a flatten of a 1x2 map)
    assert (flatten.group, flatten.scale) == (1, 2)
    assert _identify([10] * 5, KEEPS).group is None  # the classifier's outputs: constant


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    x = torch.zeros(1, 1, 16, 16)
    groups = discover_groups(model, x)
    cost = CostModel.build(model, x, groups)
    backend = OnnxRuntimeCPU(intra_op_threads=1)
    grid = ChannelGrid.for_target(1, backend.kernel_alignment())
    request = TableRequest(target="cpu", precision="fp32", batch_size=1, input_shape=(1, 16, 16),
                           backend_settings=backend.session_settings(), grid=grid, variants=6, warmup=5, runs=30,
                           iterations=60)
    min_keep = minimum_keep(groups, 0.1, grid)
    work = tmp_path_factory.mktemp("variants")
    table, samples = build_latency_model(model, x, groups, cost, backend, request, work, min_keep=min_keep)
    return model, x, groups, cost, backend, request, table, samples, work, min_keep


def test_table_is_built_from_profiled_variants_and_predicts_unseen_plans(small_table):
    model, x, groups, cost, backend, request, table, samples, work, min_keep = small_table
    assert len(samples) == 8 and table.kind == "per-layer"
    assert all(s.profile.source == "onnxruntime-profiling" and s.profile.layers for s in samples)
    assert samples[0].keep == [int(c) for c in cost.full_keep]
    # Every variant was drawn on the target's grid, and the table says which grid that was.
    assert table.grid == request.grid
    for s in samples:
        for k, c, lo in zip(s.keep, cost.full_keep, min_keep):
            assert k in request.grid.widths(int(c), lo)
    # Every conv layer is tied to a group or a constant; widths follow the plan.
    assert len(table.layers) >= 19
    assert table.fit["leave_one_out_mape_pct"] >= 0 and table.fit["in_sample_mape_pct"] < 40
    # Wider plans are predicted slower (non-negative coefficients), and an unseen plan lands near
    # its measurement (the tolerance is loose: this is a 2-core shared test machine, the bench
    # holds the real fidelity figure).
    full, smallest = table.predict(cost.full_keep), table.predict(np.array(min_keep))
    assert full > smallest > 0
    keep = variant_plans(cost, groups, min_keep, request.grid, 1, seed=99)[2]
    path = work / "unseen.onnx"
    export_onnx(prune_to(model, x, groups, keep, cost.group_names), x, path)
    measured = backend.measure(path, (1, 1, 16, 16), warmup=10, iterations=100).latency.median_ms
    assert table.predict(keep) == pytest.approx(measured, rel=0.5)


def test_table_round_trips_and_refuses_another_job(small_table, tmp_path):
    model, x, groups, cost, backend, request, table, *_ = small_table
    path = save_table(table, tmp_path / "t.json")
    again = load_table_file(path)
    for keep in (cost.full_keep, cost.full_keep // 2 + 1):
        assert again.predict(keep) == pytest.approx(table.predict(keep))
    assert again.group_steps() == table.group_steps() and again.grid == table.grid
    key = table_key(model, backend, request)
    check_table_matches(again, key, source="t.json")  # same job: accepted
    with pytest.raises(BadInput, match="input_shape"):
        check_table_matches(again, {**key, "input_shape": [1, 32, 32]}, source="t.json")
    other = table_key(model, backend, TableRequest(**{**request.__dict__, "input_shape": (1, 32, 32)}))
    assert key_digest(other) != key_digest(key)
    assert str(cache_dir()).startswith(str(tmp_path.parent.parent))  # tests never touch ~/.cache
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(BadInput, match="schema_version"):
        load_table_file(bad)
    with pytest.raises(BadInput, match="not found"):
        load_table_file(tmp_path / "missing.json")


def test_corrected_latency_moves_the_prediction_by_the_measured_miss(small_table):
    table = small_table[6]
    keep = np.array(small_table[3].full_keep)
    corrected = CorrectedLatency(table)
    raw = table.predict(keep)
    corrected.correct(keep, raw * 1.2)
    assert corrected.predict(keep) == pytest.approx(raw * 1.2)
    assert corrected.history[-1]["factor"] == pytest.approx(1.2)


def test_solver_gets_a_coarser_step_only_where_one_was_seen(small_table):
    table: LatencyTable = small_table[6]
    base = ChannelGrid()
    grids = table.grids_for_solver([base] * len(table.group_names))
    assert len(grids) == len(table.group_names)
    seen = table.group_steps()
    for name, channels, grid in zip(table.group_names, table.channels, grids):
        expected = seen.get(name, {}).get("step", 1)
        assert grid.step == (expected if 1 < expected < channels else 1)
    # A target grid already at the table's step stays as it is (free counts below the block included).
    target = table.grid
    assert all(g == target or g.step > target.step
               for g in table.grids_for_solver([target] * len(table.group_names)))


def _synthetic_samples(cliff_params: float | None, n: int = 16, seed: int = 0):
    """Profiles of a 3-conv chain (two groups) whose weight reads slow down past `cliff_params`."""
    from compressor.latency_table import VariantSample
    from deploy.backends.base import LayerProfile, LayerTime

    rng = np.random.default_rng(seed)
    full = np.array([256, 512])
    keeps = [full] + [np.maximum((full * rng.uniform(0.1, 1.0, 2)).round(), 1) for _ in range(n - 1)]
    form = {"c0": 0.0, "a": np.zeros(2), "q": np.array([[0.0, 9 * 64.0], [0.0, 0.0]])}
    shapes = lambda k: [(3, k[0]), (k[0], k[1]), (k[1], 10)]  # noqa: E731

    samples = []
    for k in keeps:
        params = float(form["q"][0, 1] * k[0] * k[1])  # the middle conv dominates
        slow = 0.0 if cliff_params is None else 0.05 * max(params - cliff_params, 0.0) / 1e6
        layers = [LayerTime(f"/l{i}/conv/Conv", "Conv", 1e-6 * ci * co * (1.0 + slow) + 0.005, ci, co)
                  for i, (ci, co) in enumerate(shapes(k))]
        total = 1.05 * sum(layer.median_ms for layer in layers) + 0.01
        samples.append(VariantSample([int(c) for c in k], total, 0.0, params, LayerProfile(layers, total, 10, "test")))
    return samples, form


def test_weight_traffic_term_is_adopted_only_where_the_variants_show_one():
    from compressor.latency_table import fit_latency_table

    smooth, form = _synthetic_samples(None)
    table = fit_latency_table(["a", "b"], [256, 512], smooth, params_form=form)
    assert table.memory is None and table.fit["in_sample_mape_pct"] < 1.0
    # Past 20M parameters every weight read costs more: found, near that threshold, and it predicts
    # plans it was not fitted on (the table without the term cannot).
    cliff, form = _synthetic_samples(20e6)
    table = fit_latency_table(["a", "b"], [256, 512], cliff, params_form=form)
    assert table.memory is not None and table.memory["threshold_params"] == pytest.approx(20e6, rel=0.2)
    without = fit_latency_table(["a", "b"], [256, 512], cliff, params_form=None)
    assert without.memory is None
    unseen, _ = _synthetic_samples(20e6, n=12, seed=1)
    err = lambda t: np.mean([abs(t.predict(s.keep) / s.total_ms - 1) for s in unseen[1:]])  # noqa: E731
    assert err(table) < 0.03 < err(without)
    # The term survives the round trip through latency_table.json.
    again = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.predict(unseen[3].keep) == pytest.approx(table.predict(unseen[3].keep))


def test_cached_table_builds_once_then_loads_and_rebuilds_a_damaged_entry(small_table):
    from compressor.latency_profiling import cached_table

    table = small_table[6]
    key = {"test": "cached_table"}
    builds, warnings = [], []

    def build():
        builds.append(1)
        return table

    first, info = cached_table(key, build, warn=warnings.append)
    assert builds == [1] and info["source"] == "built on the target in this run" and "cached_as" in info
    again, info = cached_table(key, build, warn=warnings.append)
    assert builds == [1] and info["source"].startswith("cache: ")
    full = small_table[3].full_keep
    assert again.predict(full) == pytest.approx(table.predict(full))
    (cache_dir() / f"{key_digest(key)}.json").write_text("{not json")
    _, info = cached_table(key, build, warn=warnings.append)
    assert builds == [1, 1] and info["source"] == "built on the target in this run"
    assert len(warnings) == 1 and "ignoring the cached latency table" in warnings[0]
