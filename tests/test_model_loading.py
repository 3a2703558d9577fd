"""build_model spec forms, weight loading and the input-shape check; every user error is one-line BadInput."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from compressor.errors import BadInput
from compressor.model_loading import build_model, check_input_shape, load_weights, save_weights

FIXTURES = Path(__file__).parent / "fixtures"
CUSTOM = FIXTURES / "custom_net.py"


def _bad(fn, *args, **kwargs) -> str:
    with pytest.raises(BadInput) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_zoo_name():
    model = build_model("resnet20", num_classes=3, in_channels=1)
    assert model.fc.out_features == 3 and model.conv1.in_channels == 1


def test_file_factory_gets_num_classes_and_in_channels():
    model = build_model(f"{CUSTOM}:build", num_classes=5, in_channels=1)
    assert model.fc.out_features == 5 and model.stem[0].in_channels == 1
    check_input_shape(model, (1, 20, 12))


def test_file_factory_only_given_what_it_accepts():
    model = build_model(f"{CUSTOM}:build_only_classes", num_classes=4, in_channels=3)
    assert model.fc.out_features == 4


def test_same_file_name_in_two_folders_are_distinct_modules(tmp_path):
    for sub, k in (("a", 2), ("b", 3)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "net.py").write_text(
            f"import torch.nn as nn\ndef make(**kw):\n    return nn.Linear(4, {k})\n")
    a = build_model(f"{tmp_path / 'a' / 'net.py'}:make", num_classes=2, in_channels=3)
    b = build_model(f"{tmp_path / 'b' / 'net.py'}:make", num_classes=2, in_channels=3)
    assert (a.out_features, b.out_features) == (2, 3)


def test_file_can_import_its_sibling(tmp_path):
    (tmp_path / "helper_block_xyz.py").write_text("import torch.nn as nn\nWIDTH = 6\n")
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\nfrom helper_block_xyz import WIDTH\n"
        "def make(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.LazyLinear(WIDTH), nn.Linear(WIDTH, num_classes))\n")
    model = build_model(f"{tmp_path / 'net.py'}:make", num_classes=2, in_channels=3)
    assert model[2].out_features == 2
    assert str(tmp_path) not in [os.path.abspath(p) for p in __import__("sys").path]


def test_package_module_factory(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_for_loading"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch.nn as nn\nclass Factory:\n    @staticmethod\n"
        "    def tiny(num_classes=10, **kwargs):\n"
        "        return nn.Sequential(nn.Conv2d(kwargs['in_channels'], 4, 3), nn.AdaptiveAvgPool2d(1),"
        " nn.Flatten(), nn.Linear(4, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("userpkg_for_loading.nets:Factory.tiny", num_classes=6, in_channels=2)
    check_input_shape(model, (2, 8, 8))
    assert model[3].out_features == 6


def test_spec_errors(tmp_path):
    assert "file not found" in _bad(build_model, "missing/net.py:build", num_classes=2, in_channels=3)
    (tmp_path / "syntax.py").write_text("def build(:\n")
    assert "SyntaxError" in _bad(build_model, f"{tmp_path / 'syntax.py'}:build", num_classes=2, in_channels=3)
    (tmp_path / "imports.py").write_text("import not_a_real_module_42\n")
    msg = _bad(build_model, f"{tmp_path / 'imports.py'}:build", num_classes=2, in_channels=3)
    assert "ModuleNotFoundError" in msg and "not_a_real_module_42" in msg
    assert "no attribute 'nope'" in _bad(build_model, f"{CUSTOM}:nope", num_classes=2, in_channels=3)
    assert "not callable" in _bad(build_model, f"{CUSTOM}:NOT_CALLABLE", num_classes=2, in_channels=3)
    msg = _bad(build_model, f"{CUSTOM}:build_broken", num_classes=2, in_channels=3)
    assert "RuntimeError: weights server unreachable" in msg
    msg = _bad(build_model, f"{CUSTOM}:build_not_a_module", num_classes=2, in_channels=3)
    assert "dict" in msg and "nn.Module" in msg
    msg = _bad(build_model, "resnet21", num_classes=2, in_channels=3)
    assert "resnet21" in msg and "resnet20" in msg and "resnet56" in msg
    assert "cannot import module" in _bad(build_model, "no_such_pkg_42.mod:f", num_classes=2, in_channels=3)
    for malformed in ("", "a b:c", "x.py", "mod:", ":f", "torchvision:"):
        _bad(build_model, malformed, num_classes=2, in_channels=3)


@pytest.mark.parametrize("lib", ["torchvision", "timm"])
def test_optional_libraries_named_when_missing(lib):
    if importlib.util.find_spec(lib) is not None:
        pytest.skip(f"{lib} is installed here")
    msg = _bad(build_model, f"{lib}:resnet18", num_classes=10, in_channels=3)
    assert msg == f"{lib} is not installed (pip install {lib})"


def _tiny_resnet(num_classes=10):
    return build_model("resnet20", num_classes=num_classes, in_channels=3)


def test_weights_round_trip_and_wrappers(tmp_path):
    torch.manual_seed(0)
    src = _tiny_resnet()
    path = save_weights(src, tmp_path / "w.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # no temp file left behind
    state = src.state_dict()
    for name, obj in [("plain.pt", state), ("wrapped.pt", {"state_dict": state, "epoch": 3}),
                      ("model.pt", {"model": state}), ("ddp.pt", {f"module.{k}": v for k, v in state.items()})]:
        if name != "plain.pt":
            torch.save(obj, tmp_path / name)
        dst = _tiny_resnet()
        load_weights(dst, path if name == "plain.pt" else tmp_path / name)
        for k, v in src.state_dict().items():
            assert torch.equal(v, dst.state_dict()[k]), (name, k)


def test_weights_errors(tmp_path):
    model = _tiny_resnet()
    assert "not found" in _bad(load_weights, model, tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint at all" * 10)
    assert "cannot read weights" in _bad(load_weights, model, tmp_path / "garbage.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    assert "list" in _bad(load_weights, model, tmp_path / "list.pt")
    # A pickled module (code, not weights) is refused by weights_only=True.
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    assert "cannot read weights" in _bad(load_weights, model, tmp_path / "module.pt")
    # Keys of a different architecture.
    torch.save(build_model("resnet56", num_classes=10, in_channels=3).state_dict(), tmp_path / "r56.pt")
    msg = _bad(load_weights, model, tmp_path / "r56.pt")
    assert "unexpected keys" in msg and "layer1.3" in msg and "more)" in msg
    # Same architecture, different head.
    torch.save(_tiny_resnet(num_classes=7).state_dict(), tmp_path / "c7.pt")
    msg = _bad(load_weights, model, tmp_path / "c7.pt")
    assert "shape mismatch" in msg and "fc.weight (7, 64) vs model (10, 64)" in msg


def test_check_input_shape():
    model = build_model("resnet20", num_classes=10, in_channels=3)
    model.train()
    check_input_shape(model, (3, 8, 8))
    assert model.training  # mode restored
    msg = _bad(check_input_shape, model, (1, 32, 32))
    assert msg.startswith("model rejects input shape 1x32x32: RuntimeError")
    features = nn.Sequential(nn.Conv2d(3, 4, 3))  # no head: 4-D output
    assert "expected a [1, num_classes] tensor" in _bad(check_input_shape, features, (3, 16, 16))
    flatten_only = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    msg = _bad(check_input_shape, flatten_only, (3, 8, 8))
    assert "3x8x8" in msg


def test_custom_net_prunes_with_torch_pruning():
    """Depthwise conv, concat, squeeze-excitation and residual add: pruning a group keeps the net valid."""
    model = build_model(f"{CUSTOM}:build", num_classes=10, in_channels=3).eval()
    example = torch.randn(2, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    # branch_a's channels flow through the concat into the depthwise conv, the SE gate and both 1x1 convs.
    dg.get_pruning_group(model.branch_a[0], tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    assert model.branch_a[0].out_channels == 10
    assert model.dw[0].in_channels == model.dw[0].out_channels == model.dw[0].groups == 22
    assert model.se.fc1.in_channels == model.se.fc2.out_channels == 22
    assert model.pw[0].in_channels == model.shortcut[0].in_channels == 22
    # The residual add couples pw and shortcut outputs.
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    dg.get_pruning_group(model.pw[0], tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    assert model.pw[0].out_channels == model.shortcut[0].out_channels == model.fc.in_features == 30
    with torch.no_grad():
        assert model(example).shape == (2, 10)
    check_input_shape(model, (3, 24, 40))
