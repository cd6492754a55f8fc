"""Step-size control per sample: control.py's error norm, PI controller and initial step,
vectorised over a batch of independent problems.

Every quantity is one value per sample, float64 of shape (batch,) (the shared-step loop keeps
them as Python floats, i.e. float64, so each sample takes the step sequence of its lone solve).
`propose` and `clamp` take NumPy arrays (per_sample_loop.py keeps the controller on the host,
read once per step) or tensors (no host synchronisation) alike; the error norm and the initial
step are tensor functions on y's device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .control import PIController, StepControl

__all__ = ["sample_rms", "sample_scaled_error", "initial_step_sizes", "propose", "clamp"]


def sample_rms(x: Tensor) -> Tensor:
    """RMS over each sample's components (HNW II (4.11)): x (batch, ...) -> (batch,)."""
    return x.pow(2).reshape(x.shape[0], -1).mean(dim=1).sqrt()


def sample_scaled_error(
    error: Tensor, y0: Tensor, y1: Tensor, rtol: Tensor | float, atol: Tensor | float
) -> Tensor:
    """‖err / (atol + rtol · max(|y0|, |y1|))‖ per sample, float64 (control.scaled_error)."""
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    return sample_rms(error / scale).double()


def _namespace(x):
    """numpy for an ndarray, torch for a tensor (the functions they share: where, clip, …)."""
    return np if isinstance(x, np.ndarray) else torch


def _python_max(a: Tensor, b: Tensor | float) -> Tensor:
    """Python's max(a, b): a unless b > a (so a NaN b gives a, as in control.py)."""
    return _namespace(a).where(b > a, b, a)


def _python_min(a: Tensor | float, b: Tensor) -> Tensor:
    """Python's min(a, b): a unless b < a."""
    return torch.where(b < a, b, a)


def initial_step_sizes(
    f: Callable[[Tensor, Tensor], Tensor], t0: Tensor, y0: Tensor, f0: Tensor,
    direction: Tensor, order: int, rtol: Tensor | float, atol: Tensor | float,
) -> Tensor:
    """HNW I, II.4 per sample (control.initial_step_size): h from ‖y0‖, ‖f0‖ and a
    difference estimate of ‖y''‖, one f evaluation for the batch; signed, float64 (batch,)."""
    view = (-1,) + (1,) * (y0.dim() - 1)
    scale = atol + rtol * y0.abs()
    d0 = sample_rms(y0 / scale).double()
    d1 = sample_rms(f0 / scale).double()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    step = direction * h0
    y1 = y0 + step.to(y0.dtype).reshape(view) * f0
    f1 = f(t0 + step.to(t0.dtype), y1)
    d2 = sample_rms((f1 - f0) / scale).double() / h0
    largest = _python_max(d1, d2)
    h1 = torch.where(
        largest <= 1e-15, _python_max(torch.full_like(h0, 1e-6), h0 * 1e-3),
        (0.01 / largest) ** (1.0 / (order + 1)),
    )
    h = _python_min(100 * h0, h1)
    h = torch.where(torch.isfinite(h), h, 1e-6)
    return direction * h


def propose(
    controller: PIController, h: Tensor, ratio: Tensor, accepted: Tensor, previous: Tensor
) -> tuple[Tensor, Tensor]:
    """PIController.propose per sample (HW IV.2 (2.43c)): the next h and the new ε_{n−1}.

    h_new = h · safety · ε_n^(−β₁/k) · ε_{n−1}^(β₂/k) (the last factor on acceptance only),
    k = 1 + the embedded order, clipped to [min_factor, max_factor], ≤ 1 after a rejection.
    `ratio` must be finite (the loop handles non-finite errors itself).
    """
    xp = _namespace(h)
    k = controller.error_order + 1
    factor = controller.safety * ratio ** (-controller.beta1 / k)
    factor = xp.where(accepted, factor * previous ** (controller.beta2 / k), factor)
    factor = xp.where(ratio == 0.0, controller.max_factor, factor)
    factor = xp.clip(factor, controller.min_factor, controller.max_factor)
    previous = xp.where(accepted, _python_max(ratio, 1e-4), previous)
    factor = xp.where(accepted, factor, xp.clip(factor, None, 1.0))
    return h * factor, previous


def clamp(control: StepControl, h: Tensor) -> Tensor:
    """StepControl.clamp per sample: |h| clipped to [min_step, max_step], its sign kept."""
    xp = _namespace(h)
    return xp.copysign(xp.clip(xp.abs(h), control.min_step, control.max_step), h)
