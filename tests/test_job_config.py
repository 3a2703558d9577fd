"""Job configuration: compress.yaml + flags, budgets, validation."""
from pathlib import Path

import pytest

from compressor.errors import BadInput
from compressor.job_config import Budget, build_job_config, parse_input_size, pick_budget
from compressor.quantities import parse_quantity


@pytest.mark.parametrize("text,value", [("59.5M", 59.5e6), ("1.8G", 1.8e9), ("250k", 250e3), ("5", 5.0),
                                        ("2.5", 2.5), (" 7e2 ", 700.0), (3, 3.0)])
def test_parse_quantity(text, value):
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "abc", "5X", "1.2.3", "nan", "--3", True])
def test_parse_quantity_rejects(text):
    with pytest.raises(BadInput):
        parse_quantity(text)


def _flags(**kw):
    base = {"model": "resnet20", "data": "digits"}
    base.update(kw)
    return base


def test_one_budget_required(tmp_path):
    with pytest.raises(BadInput, match="no budget"):
        build_job_config(_flags(), config_path=tmp_path / "none.yaml")


def test_two_budgets_rejected(tmp_path):
    with pytest.raises(BadInput, match="exactly one budget"):
        build_job_config(_flags(latency_ms="5", flops="10M"), config_path=tmp_path / "none.yaml")


@pytest.mark.parametrize("kind", ["latency_ms", "speedup", "flops", "params"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_nonpositive_budget_rejected(tmp_path, kind, value):
    with pytest.raises(BadInput):
        build_job_config(_flags(**{kind: value}), config_path=tmp_path / "none.yaml")


def test_speedup_below_one_rejected():
    with pytest.raises(BadInput, match="speedup"):
        pick_budget({"speedup": "0.5"}, where="x")


def test_budget_suffixes(tmp_path):
    cfg = build_job_config(_flags(flops="59.5M"), config_path=tmp_path / "none.yaml")
    assert cfg.budget == Budget("flops", 59.5e6)


def test_yaml_defaults_and_flag_override(tmp_path):
    path = tmp_path / "compress.yaml"
    path.write_text("model: resnet56\ndata: shapes\ntarget: cpu\nbudget:\n  latency_ms: 5\nfinetune-epochs: 3\n")
    cfg = build_job_config({"model": None, "data": None}, config_path=path)
    assert (cfg.model, cfg.data, cfg.budget, cfg.finetune_epochs) == ("resnet56", "shapes", Budget("latency_ms", 5), 3)
    cfg = build_job_config({"model": "resnet20", "speedup": "2"}, config_path=path)
    assert cfg.model == "resnet20"
    assert cfg.budget == Budget("speedup", 2.0)  # a flag budget replaces the file's budget


@pytest.mark.parametrize("content,match", [
    ("model: [unclosed", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("model: x\nbogus: 1\n", "unknown key"),
    ("budget: 5\n", "budget"),
    ("latency_ms: 5\nflops: 3M\n", "exactly one budget"),
])
def test_bad_yaml(tmp_path, content, match):
    path = tmp_path / "compress.yaml"
    path.write_text(content)
    with pytest.raises(BadInput, match=match):
        build_job_config(_flags(), config_path=path)


def test_default_out_is_timestamped(tmp_path):
    cfg = build_job_config(_flags(speedup="2"), config_path=tmp_path / "none.yaml")
    assert cfg.out.parent == Path("runs") and cfg.out.name.endswith("Z")


@pytest.mark.parametrize("text,size", [("32", (32, 32)), ("24x40", (24, 40)), ([16, 20], (16, 20))])
def test_input_size(text, size):
    assert parse_input_size(text) == size


@pytest.mark.parametrize("text", ["4", "axb", "3x"])
def test_input_size_rejects(text):
    with pytest.raises(BadInput):
        parse_input_size(text)


def test_shapley_is_the_default_ranking_with_documented_settings(tmp_path):
    cfg = build_job_config(_flags(flops="10M"), config_path=tmp_path / "none.yaml")
    assert (cfg.ranking, cfg.shapley_samples, cfg.shapley_permutations, cfg.shapley_evaluations,
            cfg.shapley_max_channels) == ("shapley", 64, 8, 30, 128)
    cfg = build_job_config(_flags(flops="10M", shapley_samples=16, shapley_permutations=2, shapley_evaluations=0,
                                  shapley_max_channels=0), config_path=tmp_path / "none.yaml")
    assert (cfg.shapley_samples, cfg.shapley_permutations, cfg.shapley_evaluations, cfg.shapley_max_channels) == \
        (16, 2, 0, 0)
    assert cfg.fingerprint()["shapley_samples"] == 16  # a resume with other Shapley settings is refused
    assert cfg.fingerprint()["shapley_max_channels"] == 0


@pytest.mark.parametrize("key,value", [("shapley_samples", 0), ("shapley_permutations", 1),
                                       ("shapley_evaluations", -1), ("shapley_samples", "many"),
                                       ("shapley_max_channels", -1), ("shapley_max_channels", 1.5)])
def test_bad_shapley_settings_are_one_line_errors(tmp_path, key, value):
    with pytest.raises(BadInput, match="--" + key.replace("_", "-")):
        build_job_config(_flags(flops="10M", **{key: value}), config_path=tmp_path / "none.yaml")


def test_nhsic_sharpness_default_follows_the_utility(tmp_path):
    from compressor.job_config import BETA_PER_LAYER
    none = tmp_path / "none.yaml"
    assert build_job_config(_flags(speedup=2), config_path=none).beta_per_layer == BETA_PER_LAYER["log"]
    linear = build_job_config(_flags(speedup=2, utility="linear"), config_path=none)
    assert linear.beta_per_layer == BETA_PER_LAYER["linear"] == 18.5  # ITPruner's published ResNet-56 value
    assert build_job_config(_flags(speedup=2, beta_per_layer=7.0), config_path=none).beta_per_layer == 7.0
    assert BETA_PER_LAYER["log"] < BETA_PER_LAYER["linear"]
