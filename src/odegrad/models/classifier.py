"""ODE-Net image classifier (Chen et al. 2018, §7.1): downsampling convolutions, ODE blocks on
the feature maps, a linear head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .odeblock import ODEBlock


def _norm(channels: int) -> nn.GroupNorm:
    """Group normalisation: no running buffers, so re-evaluating f never changes module state."""
    return nn.GroupNorm(min(32, channels), channels)


class ConcatConv2d(nn.Module):
    """A 3x3 convolution of the feature map with t appended as a constant channel."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 1, out_channels, 3, padding=1)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        time = t.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([time, x], 1))


class ConvField(nn.Module):
    """f(t, y) = norm(conv(t, relu(norm(conv(t, relu(norm(y))))))), a time-dependent conv field."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = _norm(channels), _norm(channels), _norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.conv2 = ConcatConv2d(channels, channels)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        out = self.conv1(t, torch.relu(self.norm1(y)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class ODENetClassifier(nn.Module):
    """Images (N, C, H, W) -> logits (N, classes).

    `downsample` stride-2 convolutions shrink the map before the ODE blocks (0 for 8x8 digits,
    2 for 28x28 MNIST, as in the paper); `blocks` ODE blocks follow, each solved over [0, 1];
    then norm, ReLU, average pooling to a `pool` x `pool` map and a linear layer. (Global
    pooling, pool=1, throws away where features are: on 8x8 digits it learns far slower.)
    `solver` holds the ODEBlock keywords (method, gradient, step_size, rtol, atol, checkpoints,
    options).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, channels: int = 32,
        downsample: int = 0, blocks: int = 1, pool: int = 4, **solver,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        for _ in range(downsample):
            layers += [_norm(channels), nn.ReLU(), nn.Conv2d(channels, channels, 4, 2, 1)]
        self.stem = nn.Sequential(*layers)
        self.blocks = nn.ModuleList(ODEBlock(ConvField(channels), **solver) for _ in range(blocks))
        self.head = nn.Sequential(
            _norm(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(pool), nn.Flatten(),
            nn.Linear(channels * pool * pool, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def ode_stats(self) -> list[dict]:
        """The last solve's statistics of every ODE block."""
        return [block.stats for block in self.blocks]
