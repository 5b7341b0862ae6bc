"""tld.bench's measurements: FLOPs counted right."""

import torch

from tld import bench


def test_a_grouped_convolution_backward_costs_two_forwards():
    # torch's formula counts a depthwise conv's weight gradient as a dense one's; ours does not
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    forward = 2 * 2 * 64 * 8 * 8 * 9  # 2 FLOPs per multiply-add, batch 2, 64 channels, 8x8, a 3x3 kernel each
    assert bench.step_flops(lambda: conv(x).sum()) == 3 * forward
    dense = torch.nn.Conv2d(8, 16, 3, padding=1)  # groups=1: torch's own count, unchanged
    y = torch.randn(2, 8, 8, 8, requires_grad=True)
    assert bench.step_flops(lambda: dense(y).sum()) == 3 * 2 * 2 * 16 * 64 * 9 * 8
