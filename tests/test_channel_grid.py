"""The channel grid: which counts the solver may pick on a target, and how it is found."""
import numpy as np
import onnx
import pytest
import torch

from compressor.allocation import solve_allocation
from compressor.channel_grid import ChannelGrid, as_grids
from compressor.errors import BadInput
from deploy.backends.base import KernelAlignment
from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU, nchwc_block_size


def test_widths_are_multiples_of_the_step_plus_free_small_counts_and_the_full_width():
    grid = ChannelGrid(step=16, free_below=16)
    assert grid.widths(64, 1).tolist() == list(range(1, 16)) + [16, 32, 48, 64]
    assert grid.widths(40, 5).tolist() == list(range(5, 16)) + [16, 32, 40]  # full width is always allowed
    assert ChannelGrid(step=8).widths(20, 3).tolist() == [8, 16, 20]
    assert grid.minimum(64, 20) == 32 and ChannelGrid(step=8).minimum(6, 2) == 6
    assert grid.snap(41, 64) == 48 and grid.snap(9.4, 64) == 9 and grid.snap(27, 64) == 32


def test_target_grid_combines_profile_and_kernels():
    kernels = KernelAlignment(step=16, free_below=16, source="probe")
    assert ChannelGrid.for_target(1, kernels) == ChannelGrid(16, 16, "probe")
    # A profile step the kernel block is not a multiple of: their lcm, and no free small counts
    # (those would break the profile's own alignment).
    assert ChannelGrid.for_target(8, kernels).step == 16
    assert ChannelGrid.for_target(8, kernels).free_below == 0
    assert ChannelGrid.for_target(8, None) == ChannelGrid(step=8)
    assert ChannelGrid.for_target(8, KernelAlignment()) == ChannelGrid(step=8)
    assert ChannelGrid.from_dict(ChannelGrid(16, 16, "x").to_dict()) == ChannelGrid(16, 16, "x")
    assert as_grids(8, 2) == [ChannelGrid(step=8)] * 2
    assert as_grids([ChannelGrid(16, 16), 4], 2)[1] == ChannelGrid(step=4)
    assert "multiples of 16, or any count below 16" in ChannelGrid(16, 16, "probe").describe()


def test_solver_only_picks_counts_on_the_grid():
    grid = ChannelGrid(step=16, free_below=16)
    channels = [16, 32, 64, 64, 24]
    cost = lambda k: float(np.sum(np.asarray(k, dtype=float) ** 2))  # noqa: E731
    alloc = solve_allocation(names=list("abcde"), channels=channels, importance=[1, 2, 3, 1, 1],
                             prunable=[True] * 5, cost_fn=cost, budget=0.4 * cost(channels), alignment=grid,
                             min_keep_ratio=0.1, utility="log")
    assert alloc.cost <= 0.4 * cost(channels)
    for name, c in zip("abcde", channels):
        assert alloc.keep[name] in grid.widths(c, 1), (name, alloc.keep[name])
    with pytest.raises(BadInput, match="alignment"):
        solve_allocation(names=["a"], channels=[8], importance=[1], prunable=[True], cost_fn=cost, budget=10.0,
                         alignment=[0])


def test_onnxruntime_kernel_alignment_is_the_padding_its_profiler_reports(tmp_path):
    """The probe's block is what ORT really pads to: a 5-channel conv reports `block` channels."""
    block = nchwc_block_size()
    alignment = OnnxRuntimeCPU(intra_op_threads=1).kernel_alignment()
    if block <= 1:
        assert alignment == KernelAlignment(source=alignment.source)
        pytest.skip("this CPU's ONNX Runtime uses no NCHWc kernels")
    assert alignment.step == block and alignment.free_below == block and str(block) in alignment.source
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(5, 7, 1)).eval()
    path = tmp_path / "probe.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 8, 8), path, dynamo=False)
    onnx.checker.check_model(str(path))
    profile = OnnxRuntimeCPU(intra_op_threads=1).profile_layers(path, (1, 3, 8, 8), warmup=2, runs=5)
    convs = [layer for layer in profile.layers if "conv" in layer.op.lower()]
    assert convs and all(layer.out_channels == block for layer in convs), [(c.op, c.out_channels) for c in convs]


def test_groups_through_a_depthwise_conv_get_the_depthwise_rule():
    from compressor.groups import discover_groups
    from compressor.models import create_model
    from compressor.pipeline import minimum_keep

    grid = ChannelGrid(step=16, free_below=16, source="probe", depthwise_free_below=0)
    assert grid.for_group(False) == ChannelGrid(16, 16, "probe")
    assert grid.for_group(True) == ChannelGrid(16, 0, "probe")
    assert ChannelGrid(16, 16).for_group(True) == ChannelGrid(16, 16)  # no separate rule: the same grid
    assert ChannelGrid.from_dict(grid.to_dict()) == grid
    assert "not through depthwise convs" in grid.describe()
    assert ChannelGrid.for_target(1, KernelAlignment(16, 16, 0, "p")) == ChannelGrid(16, 16, "p", 0)
    assert ChannelGrid.for_target(1, KernelAlignment(16, 16, 16, "p")).depthwise_free_below is None

    x = torch.zeros(1, 3, 32, 32)
    mobile = discover_groups(create_model("mobilenetv2", num_classes=10, in_channels=3).eval(), x)
    flagged = [g for g in mobile if g.depthwise]
    assert flagged and len(flagged) < len(mobile)  # expansion groups run through the depthwise conv
    assert "through a depthwise conv" in str(flagged[0])
    lows = minimum_keep(mobile, 0.1, grid)
    for g, low in zip(mobile, lows):
        if g.prunable:
            assert low in grid.for_group(g.depthwise).widths(g.channels), (g.name, low)
            assert not g.depthwise or low % 16 == 0 or low == g.channels
    resnet = discover_groups(create_model("resnet20", num_classes=10, in_channels=3).eval(), x)
    assert not any(g.depthwise for g in resnet)


def test_onnxruntime_pads_depthwise_convs_as_its_probe_says(tmp_path):
    """A depthwise conv at half the block inside a network: the probe's rule is what ORT's profiler
    reports (padded to the full block, so those counts save nothing there)."""
    block = nchwc_block_size()
    if block <= 1:
        pytest.skip("this CPU's ONNX Runtime uses no NCHWc kernels")
    alignment = OnnxRuntimeCPU(intra_op_threads=1).kernel_alignment()
    c = block // 2
    net = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(c, c, 3, padding=1, groups=c), torch.nn.ReLU(),
                              torch.nn.Conv2d(c, 7, 1)).eval()
    path = tmp_path / "depthwise.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 8, 8), path, dynamo=False)
    profile = OnnxRuntimeCPU(intra_op_threads=1).profile_layers(path, (1, 3, 8, 8), warmup=2, runs=5)
    convs = [layer for layer in profile.layers if "conv" in layer.op.lower()]
    assert len(convs) == 3, [(c.name, c.op) for c in convs]
    depthwise = convs[1]
    assert (depthwise.out_channels == block) == (alignment.depthwise_free_below == 0), \
        (depthwise.out_channels, alignment)
