"""Two-dimensional toy densities for flows: moons, circles, pinwheel, checkerboard, 8 gaussians.

Each sampler draws from a fixed distribution with a `torch.Generator`, at the scales used in the
FFJORD experiments (the data fit in about [-4, 4]²).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TOY_DENSITIES", "sample_toy"]


def _moons(n: int, g: torch.Generator) -> Tensor:
    """Two interleaved half circles with Gaussian noise (σ = 0.2 after scaling)."""
    n_outer = n // 2
    theta = torch.rand(n, generator=g) * math.pi
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    lower = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], -1)
    points = torch.where(torch.arange(n)[:, None] < n_outer, upper, lower)
    points = points + 0.1 * torch.randn(n, 2, generator=g)
    return points * 2.0 + torch.tensor([-1.0, -0.2])


def _circles(n: int, g: torch.Generator) -> Tensor:
    """Two concentric circles of radii 3 and 1.5."""
    theta = torch.rand(n, generator=g) * 2 * math.pi
    radius = torch.where(torch.arange(n) < n // 2, 1.0, 0.5)
    points = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    return 3.0 * (points + 0.08 * torch.randn(n, 2, generator=g))


def _pinwheel(n: int, g: torch.Generator) -> Tensor:
    """Five curved arms: radial/tangential Gaussian blobs bent by an exponential twist."""
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    labels = torch.randint(0, arms, (n,), generator=g)
    features = torch.randn(n, 2, generator=g) * torch.tensor([radial_std, tangential_std])
    features[:, 0] += 1.0
    angles = labels * (2 * math.pi / arms) + rate * torch.exp(features[:, 0])
    c, s = torch.cos(angles), torch.sin(angles)
    rotated = torch.stack([c * features[:, 0] - s * features[:, 1],
                           s * features[:, 0] + c * features[:, 1]], -1)
    return 2.0 * rotated


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the dark squares of a 4x4 board of side 8."""
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - 2.0 * torch.randint(0, 2, (n,), generator=g)
    x2 = x2 + torch.floor(x1).remainder(2)
    return 2.0 * torch.stack([x1, x2], -1)


def _eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    """Eight Gaussians of σ = 0.5/√2 on a circle of radius 4/√2."""
    angle = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
    centres = 4.0 * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    return (centres + 0.5 * torch.randn(n, 2, generator=g)) / math.sqrt(2.0)


_SAMPLERS = {
    "moons": _moons,
    "circles": _circles,
    "pinwheel": _pinwheel,
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
}
TOY_DENSITIES = tuple(_SAMPLERS)


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n points (n, 2) float32 from the toy density `name` (one of TOY_DENSITIES)."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown toy density {name!r}; valid: {', '.join(TOY_DENSITIES)}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return _SAMPLERS[name](n, g).to(torch.float32)
