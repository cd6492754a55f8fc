"""Where the continuous adjoints' gradient error comes from, on the default `odegrad compare`
problem (MLP field, float64, dopri5 at rtol = atol = 1e-6): the interpolant (n_nodes) or the
backward solve's tolerance (adjoint_rtol, adjoint_atol).

    PYTHONPATH=src python benchmarks/bench_adjoint_tolerance.py

Prints, per variant, the relative error of (dL/dy0, dL/dθ) against gradient="direct" at
rtol = atol = 1e-12, the backward f evaluations and stats["interpolation_error"].
"""

from __future__ import annotations

import torch

import odegrad
from odegrad.compare import Config, build, resolve

VARIANTS = [
    ("backsolve", {}),
    ("interpolated", {}),
    ("interpolated", {"n_nodes": 32}),
    ("interpolated", {"adjoint_rtol": 1e-8, "adjoint_atol": 1e-8}),
    ("backsolve", {"adjoint_rtol": 1e-8, "adjoint_atol": 1e-8}),
    ("direct", {}),
]


def gradient(setup, **options) -> tuple[torch.Tensor, dict]:
    y0 = setup.y0.clone().requires_grad_()
    sol = odegrad.solve(setup.field, y0, setup.t, method="dopri5", **options)
    grads = torch.autograd.grad(setup.loss(sol.ys[-1]), [y0, *setup.params()])
    return torch.cat([g.flatten() for g in grads]), sol.stats


def main() -> None:
    torch.set_num_threads(1)
    setup = build(resolve(Config()), torch.float64)
    reference, _ = gradient(setup, rtol=1e-12, atol=1e-12)
    print("| gradient | options | grad rel. error | NFE bwd | interpolation_error |")
    print("|---|---|---|---|---|")
    for name, options in VARIANTS:
        got, stats = gradient(setup, rtol=1e-6, atol=1e-6, gradient=name, **options)
        error = float((got - reference).norm() / reference.norm())
        estimate = stats.get("interpolation_error")
        shown = "-" if estimate is None else f"{estimate:.3g}"
        print(f"| {name} | {options or 'defaults'} | {error:.2e} | "
              f"{stats.get('nfe_backward', 0)} | {shown} |")


if __name__ == "__main__":
    main()
