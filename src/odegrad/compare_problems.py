"""The problems `odegrad compare` measures: the seeded vector fields, the configuration and its
validation (`resolve`), and the tensors of one run (`build`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .argtypes import SEED_MAX
from .errors import InvalidInputError
from .gradients import available_gradients
from .peers import PEERS
from .solvers import SOLVERS, make_solver

REFERENCE_METHOD = "dopri8"  # the ODE reference: direct through dopri8 at rtol = atol = 1e-12
REFERENCE_TOL = 1e-12
DEFAULT_STEPS = 20
FIELD_GAIN = 2.0  # weights ~ N(0, gain²/fan_in): nonlinear enough for ~15 dopri5 steps at 1e-6


def _time_like(t, y: Tensor, shape: tuple[int, ...]) -> Tensor:
    """t (a number, a 0-dim tensor or one time per batch element) broadcast to `shape`."""
    t = torch.as_tensor(t, dtype=y.dtype, device=y.device).reshape(-1)
    return t.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


class MLPField(nn.Module):
    """f(t, y) = W₃ tanh(W₂ tanh(W₁ [y, t] + b₁) + b₂) + b₃: two tanh layers, t as an input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, dim)

    def forward(self, t, y: Tensor) -> Tensor:
        tt = _time_like(t, y, (y.shape[0], 1))
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=-1))))))


class ConvField(nn.Module):
    """The conv ODE block: two 3x3 convolutions with tanh between, t concatenated as a channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.c1 = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels + 1, channels, 3, padding=1)

    def forward(self, t, y: Tensor) -> Tensor:
        tt = _time_like(t, y, (y.shape[0], 1, *y.shape[2:]))
        h = torch.tanh(self.c1(torch.cat([y, tt], dim=1)))
        return self.c2(torch.cat([h, tt], dim=1))


class CountingField(nn.Module):
    """Counts f's evaluations in the forward and the backward phase (for the peers)."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.phase = "forward"
        self.counts = {"forward": 0, "backward": 0}

    def forward(self, t, y: Tensor) -> Tensor:
        self.counts[self.phase] += 1
        return self.field(t, y)


@dataclass
class Config:
    """One comparison: the problem, the integration and the measurement settings."""

    problem: str = "mlp"
    device: str = "auto"
    dtype: str = "float64"
    method: str = "dopri5"
    steps: int | None = None  # fixed steps; None: adaptive when the method is
    rtol: float = 1e-6
    atol: float | None = None  # None: rtol
    t_end: float = 1.0
    batch: int | None = None
    dim: int | None = None  # mlp: the state size; conv: the channels
    hidden: int | None = None  # mlp: the hidden width
    image: int | None = None  # conv: the image side
    budget: int = 4  # the checkpoint budget of discrete's binomial policy
    repeats: int = 3
    seed: int = 0
    gradients: list[str] | None = None  # None: every available one
    peers: list[str] | None = None  # None: no peers; [] stands for all of them
    isolate: bool = True
    threads: int | None = None

    @property
    def fixed(self) -> bool:
        return self.steps is not None

    @property
    def step_size(self) -> float | None:
        return None if self.steps is None else self.t_end / self.steps


_SIZES = {  # (batch, dim, hidden, image) per problem, on the CPU and on CUDA
    ("mlp", "cpu"): (256, 32, 128, None), ("mlp", "cuda"): (1024, 64, 256, None),
    ("conv", "cpu"): (16, 16, None, 16), ("conv", "cuda"): (128, 64, None, 16),
}


def resolve(config: Config) -> Config:
    """Validate the configuration and fill the defaults that depend on the device."""
    if config.problem not in ("mlp", "conv"):
        raise InvalidInputError(f"--problem must be mlp or conv, got {config.problem!r}")
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InvalidInputError(
            f"--device {device!r} is not a device (cpu, cuda, cuda:1)"
        ) from None
    if parsed.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"--device must be cpu or cuda, got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device cuda: CUDA is not available on this machine")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise InvalidInputError(f"--device {device}: there are {torch.cuda.device_count()} "
                                "CUDA device(s)")
    if config.dtype not in ("float32", "float64"):
        raise InvalidInputError(f"--dtype must be float32 or float64, got {config.dtype!r}")
    if config.method not in SOLVERS:
        raise InvalidInputError(
            f"--method {config.method!r} is unknown; valid methods: {', '.join(sorted(SOLVERS))}"
        )
    steps = config.steps
    if steps is not None and steps < 1:
        raise InvalidInputError(f"--steps must be a positive integer, got {steps}")
    if steps is None and not make_solver(config.method).adaptive:
        steps = DEFAULT_STEPS
    for name in ("rtol", "t_end"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise InvalidInputError(f"--{name.replace('_', '-')} must be positive, got {value}")
    t_end32 = float(torch.tensor(config.t_end, dtype=torch.float32))
    if not (math.isfinite(t_end32) and t_end32 > 0):  # the problem is built in float32
        raise InvalidInputError(
            f"--t-end {config.t_end:g} is not a positive float32 number (from "
            f"{torch.finfo(torch.float32).smallest_normal:.3g} to "
            f"{torch.finfo(torch.float32).max:.3g})")
    atol = config.rtol if config.atol is None else config.atol
    if not (math.isfinite(atol) and atol >= 0):
        raise InvalidInputError(f"--atol must be non-negative, got {atol}")
    for name in ("repeats", "budget", "threads"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise InvalidInputError(f"--{name} must be at least 1, got {getattr(config, name)}")
    if not 0 <= config.seed <= SEED_MAX:
        raise InvalidInputError(f"--seed must be in [0, 2**63 - 1], got {config.seed}")
    present = available_gradients()
    if config.gradients is not None:
        if not config.gradients:
            raise InvalidInputError(
                f"--gradients: the list is empty; available: {', '.join(present)}")
        unknown = [g for g in config.gradients if g not in present]
        if unknown:
            raise InvalidInputError(
                f"--gradients: {', '.join(unknown)} not available; available: {', '.join(present)}"
            )
    peers = config.peers
    if peers is not None:
        unknown = [p for p in peers if p not in PEERS]
        if unknown:
            raise InvalidInputError(
                f"--peers: unknown {', '.join(unknown)}; valid peers: {', '.join(PEERS)}"
            )
        peers = list(peers) or list(PEERS)
    defaults = dict(zip(("batch", "dim", "hidden", "image"), _SIZES[(config.problem, parsed.type)]))
    sizes = {name: default if getattr(config, name) is None else getattr(config, name)
             for name, default in defaults.items()}  # 0 is an error, not the default
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise InvalidInputError(f"--{name} must be at least 1, got {value}")
    return replace(
        config, device=str(parsed), steps=steps, atol=atol, peers=peers,
        threads=config.threads or (1 if parsed.type == "cpu" else torch.get_num_threads()),
        **sizes,
    )


@dataclass
class Setup:
    """The problem's tensors: f, y0, the output times and the loss weights w."""

    field: nn.Module
    y0: Tensor
    t: Tensor
    weight: Tensor

    def params(self) -> list[Tensor]:
        return list(self.field.parameters())

    def loss(self, y_end: Tensor) -> Tensor:
        return (self.weight * y_end).sum()


def build(config: Config, dtype: torch.dtype | None = None) -> Setup:
    """The seeded problem: built in float32 and cast, so float32 and float64 share it exactly."""
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.problem == "mlp":
            field_ = MLPField(config.dim, config.hidden)
            shape = (config.batch, config.dim)
        else:
            field_ = ConvField(config.dim)
            shape = (config.batch, config.dim, config.image, config.image)
        for layer in field_.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                nn.init.normal_(layer.weight, 0.0, FIELD_GAIN / math.sqrt(fan_in))
    y0 = torch.randn(shape, generator=generator)
    weight = torch.randn(shape, generator=generator) / math.sqrt(y0.numel())
    dtype = dtype or getattr(torch, config.dtype)
    device = torch.device(config.device)
    field_ = field_.to(device=device, dtype=dtype)
    t = torch.tensor([0.0, config.t_end], dtype=torch.float32).to(device=device, dtype=dtype)
    y0, weight = y0.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype)
    return Setup(field_, y0, t, weight)


def describe(config: Config) -> str:
    if config.problem == "mlp":
        what = (f"mlp field (state {config.dim}, hidden {config.hidden}, two tanh layers, t as "
                f"an input), batch {config.batch}")
    else:
        what = (f"conv block ({config.dim} channels, {config.image}x{config.image}, two 3x3 "
                f"convolutions, tanh, t as a channel), batch {config.batch}")
    if config.fixed:
        how = f"{config.method}, {config.steps} fixed steps"
    else:
        how = f"{config.method}, adaptive, rtol={config.rtol:g} atol={config.atol:g}"
    return f"{what}; t in [0, {config.t_end:g}]; {how}; {config.dtype} on {config.device}"
