"""Data sets: normalisation contract, seeded disjoint splits, determinism, folders and user factories."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from sklearn.linear_model import RidgeClassifier

from compressor.data import DataSplits, load_data, stratified_split
from compressor.errors import BadInput

FIXTURE = Path(__file__).parent / "fixtures" / "data_factory.py"


def _bad(spec, **kwargs) -> str:
    with pytest.raises(BadInput) as info:
        load_data(spec, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    return msg


def _unnormalise(x: torch.Tensor, d: DataSplits) -> torch.Tensor:
    return x * torch.tensor(d.std).view(1, -1, 1, 1) + torch.tensor(d.mean).view(1, -1, 1, 1)


def _row_set(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("digits", seed=0, calib_size=100)


def test_digits_shapes_and_normalisation(digits):
    d = digits
    assert (d.num_classes, d.in_channels, d.input_size) == (10, 1, (32, 32))
    assert len(d.train_y) + len(d.val_y) == 1797 and 340 <= len(d.val_y) <= 380
    assert d.train_x.shape == (len(d.train_y), 1, 32, 32) and d.train_x.dtype == torch.float32
    assert d.train_y.dtype == torch.int64 and d.calib_x.shape == (100, 1, 32, 32)
    assert abs(d.train_x.mean().item()) < 1e-4 and abs(d.train_x.std().item() - 1.0) < 1e-3
    # The contract: input = (pixel/255 - mean) / std, so un-normalising lands in 0..1 for every split.
    for x in (d.train_x, d.val_x, d.calib_x):
        raw = _unnormalise(x, d)
        assert raw.min() > -1e-4 and raw.max() < 1 + 1e-4
    assert 0.1 < d.mean[0] < 0.5 and d.std[0] > 0.1
    assert d.class_names == [str(i) for i in range(10)]
    assert d.describe() == "digits: 1438 train / 359 val / 100 calib, 10 classes, input 1x32x32"


def test_digits_splits_disjoint_stratified_and_seeded(digits):
    train_rows, val_rows = _row_set(digits.train_x), _row_set(digits.val_x)
    assert not (train_rows & val_rows)
    assert _row_set(digits.calib_x) <= train_rows
    counts = torch.bincount(digits.val_y, minlength=10)
    assert counts.min() >= 33 and counts.max() <= 38  # ~20% of each class's ~180 images
    again = load_data("digits", seed=0, calib_size=100)
    assert torch.equal(again.val_x, digits.val_x) and torch.equal(again.calib_y, digits.calib_y)
    other = load_data("digits", seed=1, calib_size=100)
    assert not torch.equal(other.val_y, digits.val_y)


def test_digits_non_square_input_size():
    d = load_data("digits", input_size=(24, 40), calib_size=2000)
    assert d.train_x.shape[1:] == (1, 24, 40) and d.input_size == (24, 40)
    assert len(d.calib_y) == len(d.train_y)  # calib is capped at the train size


def test_stratified_split_properties():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(16))
    assert torch.bincount(labels[va], minlength=3).tolist() == [2, 1, 0]
    tr2, va2 = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)


def test_shapes_determinism_balance_and_difficulty():
    a = load_data("shapes:300", seed=5, calib_size=64)
    b = load_data("shapes:300", seed=5, calib_size=64)
    c = load_data("shapes:300", seed=6, calib_size=64)
    for field in ("train_x", "train_y", "val_x", "val_y", "calib_x", "calib_y"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.train_x, c.train_x)
    assert a.mean == b.mean and a.std == b.std
    assert (a.num_classes, a.in_channels, a.input_size, len(a.train_y), len(a.val_y)) == (10, 3, (32, 32), 300, 75)
    assert torch.bincount(a.train_y).tolist() == [30] * 10
    assert "circle" in a.class_names and "star" in a.class_names
    assert not (_row_set(a.train_x) & _row_set(a.val_x))
    # Not solvable from raw pixel values: a linear classifier stays near chance.
    clf = RidgeClassifier(alpha=10.0).fit(a.train_x.flatten(1).numpy(), a.train_y.numpy())
    assert clf.score(a.val_x.flatten(1).numpy(), a.val_y.numpy()) < 0.3


def test_shapes_is_learnable_by_a_small_cnn():
    """Labels carry the figure's class: a tiny CNN beats chance (10%) clearly within seconds."""
    torch.manual_seed(0)
    d = load_data("shapes:1000", seed=1, calib_size=8)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        net.train()
        perm = torch.randperm(len(d.train_y), generator=gen)
        for i in range(0, len(perm), 50):
            idx = perm[i:i + 50]
            loss = nn.functional.cross_entropy(net(d.train_x[idx]), d.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(d.val_x).argmax(1) == d.val_y).float().mean().item()
    assert acc > 0.2, acc


def test_shapes_custom_size():
    d = load_data("shapes:40", input_size=(24, 40), calib_size=4)
    assert d.train_x.shape == (40, 3, 24, 40) and d.val_x.shape == (10, 3, 24, 40)


def _write_png(path: Path, colour: tuple[int, int, int], size=(20, 14), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = colour
    arr[::3] = 255 - np.array(colour, np.uint8)  # some structure so std > 0
    img = Image.fromarray(arr, "RGB")
    (img.convert("L") if mode == "L" else img).save(path)


COLOURS = {"blue": (0, 0, 200), "green": (0, 180, 0), "red": (220, 0, 0)}


def test_imagefolder_train_val_layout(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for name, col in COLOURS.items():
            for i in range(n):
                _write_png(tmp_path / split / name / f"{i}.png", col)
    _write_png(tmp_path / "train" / "red" / "gray.jpg", (100, 100, 100), mode="L")  # converted to RGB
    (tmp_path / "train" / "red" / "README.txt").write_text("not an image, ignored")
    d = load_data(f"imagefolder:{tmp_path}", input_size=(16, 16), calib_size=5)
    assert d.class_names == ["blue", "green", "red"] and d.num_classes == 3 and d.in_channels == 3
    assert d.train_x.shape == (13, 3, 16, 16) and d.val_x.shape == (6, 3, 16, 16)
    assert torch.bincount(d.train_y).tolist() == [4, 4, 5] and torch.bincount(d.val_y).tolist() == [2, 2, 2]
    raw = _unnormalise(d.val_x, d)
    red_val = raw[d.val_y == 2]
    assert red_val[:, 0].mean() > red_val[:, 1].mean() + 0.2  # red really is red after the round trip
    assert d.name == f"imagefolder:{tmp_path}"


def test_imagefolder_flat_layout_is_split_deterministically(tmp_path):
    for name, col in COLOURS.items():
        for i in range(10):
            _write_png(tmp_path / name / f"{i}.png", tuple(min(255, c + 5 * i) for c in col))
    a = load_data(f"imagefolder:{tmp_path}", seed=2)
    b = load_data(f"imagefolder:{tmp_path}", seed=2)
    assert a.input_size == (32, 32)
    assert len(a.train_y) == 24 and len(a.val_y) == 6
    assert torch.bincount(a.val_y).tolist() == [2, 2, 2]
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not (_row_set(a.train_x) & _row_set(a.val_x))


def test_imagefolder_errors(tmp_path):
    assert "not found" in _bad(f"imagefolder:{tmp_path / 'nope'}")
    assert "no class folders" in _bad(f"imagefolder:{tmp_path}")
    _write_png(tmp_path / "one" / "cat" / "0.png", (1, 2, 3))
    assert "only one class" in _bad(f"imagefolder:{tmp_path / 'one'}")
    _write_png(tmp_path / "empty" / "cat" / "0.png", (1, 2, 3))
    (tmp_path / "empty" / "dog").mkdir()
    (tmp_path / "empty" / "dog" / "notes.txt").write_text("x")
    assert "dog has no image files" in _bad(f"imagefolder:{tmp_path / 'empty'}")
    _write_png(tmp_path / "corrupt" / "cat" / "0.png", (1, 2, 3))
    _write_png(tmp_path / "corrupt" / "dog" / "0.png", (3, 2, 1))
    (tmp_path / "corrupt" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    msg = _bad(f"imagefolder:{tmp_path / 'corrupt'}")
    assert "cannot read image" in msg and "broken.png" in msg
    for name in ("cat", "dog"):
        _write_png(tmp_path / "extra" / "train" / name / "0.png", (9, 9, 9))
    _write_png(tmp_path / "extra" / "val" / "bird" / "0.png", (9, 9, 9))
    assert "bird" in _bad(f"imagefolder:{tmp_path / 'extra'}")
    assert "imagefolder:DIR" in _bad("imagefolder:")


def test_factory_pair_of_datasets():
    d = load_data(f"{FIXTURE}:pair", seed=0, calib_size=8)
    assert d.class_names == ["top_left", "top_right", "bottom_left", "bottom_right"]
    assert d.train_x.shape == (40, 3, 12, 12) and d.val_x.shape == (12, 3, 12, 12) and len(d.calib_y) == 8
    assert abs(d.train_x.mean().item()) < 1e-4
    # Float 0..1 images give the same contract as uint8 0..255 (same statistics up to rounding).
    f = load_data(f"{FIXTURE}:pair_float", seed=0, calib_size=8, input_size=(8, 16))
    assert f.train_x.shape == (40, 3, 8, 16)
    assert max(abs(a - b) for a, b in zip(f.mean, d.mean)) < 0.05
    # The quadrant carries the label after normalisation: brightest quadrant == class.
    quads = d.val_x.mean(1).unfold(1, 6, 6).unfold(2, 6, 6).mean((-1, -2)).flatten(1)
    assert torch.equal(quads.argmax(1), d.val_y)


def test_factory_ready_splits_and_errors():
    d = load_data(f"{FIXTURE}:ready_splits")
    assert d.name == "ready" and len(d.calib_y) == 8
    assert "values span" in _bad(f"{FIXTURE}:float_out_of_range")
    assert "fewer than 2 classes" in _bad(f"{FIXTURE}:one_class")
    msg = _bad(f"{FIXTURE}:broken")
    assert "FileNotFoundError: no such bucket" in msg
    assert "expected DataSplits or (train, val)" in _bad(f"{FIXTURE}:wrong_type")
    assert "no attribute" in _bad(f"{FIXTURE}:nothing_here")
    assert "file not found" in _bad("missing/data.py:make")


def test_unknown_spec_and_bad_options():
    msg = _bad("cifar10")
    assert "digits" in msg and "shapes" in msg and "imagefolder:DIR" in msg
    assert "shapes:N" in _bad("shapes:lots")
    assert "calibration size" in _bad("digits", calib_size=0)
    assert "val_fraction" in _bad("digits", val_fraction=1.0)
